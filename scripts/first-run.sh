#!/usr/bin/env bash
# The README's "Try it on your machine" steps, run as written on a fresh clone, checked: a
# signed NPS webhook must reach a local stand-in for Heap as `Userpilot NPS (score)`. Prints
# the time from start to the first event (the build included). CI runs it.
#
#   bash scripts/first-run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work" data/try.sqlite3 data/try.sqlite3-wal data/try.sqlite3-shm data/nps.json
}
trap cleanup EXIT

# 1. Build.
cargo build --quiet
relay=./target/debug/userpilot-heap-relay

# As in a fresh shell: the relay reads every RELAY_* variable as configuration (and refuses
# unknown keys), so none inherited from the caller (CI exports RELAY_TEST_POSTGRES_URL) may
# leak in. Only after the build: build.rs reads that one, and CI has just built with it.
for name in $(compgen -e | grep '^RELAY_' || true); do unset "$name"; done

# 2. A local stand-in for Heap, printing what the relay sends it.
python3 scripts/heap-sink.py 8081 >"$work/heap.jsonl" 2>"$work/heap.log" &
pids+=($!)

# 3. The relay, pointed at it.
export RELAY_HEAP__APP_ID=1234567890 RELAY_USERPILOT__SECRETS=try-it-locally-secret \
       RELAY_HEAP__BASE_URL=http://127.0.0.1:8081 RELAY_QUEUE__PATH=data/try.sqlite3
$relay >"$work/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  $relay healthcheck --url http://127.0.0.1:8080/readyz 2>/dev/null && break
  sleep 0.1
done
$relay healthcheck --url http://127.0.0.1:8080/readyz || { cat "$work/relay.log"; exit 1; }

# 4. A signed NPS webhook.
mkdir -p data
echo '{"timestamp": '"$(date +%s)"', "data": {"type": "nps", "score": 9, "feedback": "Love it",
      "user": {"user_id": "u_123", "email": "jane@example.com"}}}' > data/nps.json
SIG=$($relay sign data/nps.json)
answer=$(curl -s -w ' %{http_code}' http://127.0.0.1:8080/webhooks/userpilot \
  -H 'content-type: application/json' -H "x-signature: $SIG" --data-binary @data/nps.json)
echo "relay answered: $answer"
[[ "$answer" == *'"status":"accepted"'*' 202' ]] || { cat "$work/relay.log"; exit 1; }

# The forwarder sends within its linger (a fraction of a second); allow ten seconds.
for _ in $(seq 1 100); do
  grep -q '"Userpilot NPS (score)"' "$work/heap.jsonl" && break
  sleep 0.1
done
if ! grep -q '"Userpilot NPS (score)"' "$work/heap.jsonl"; then
  echo "first-run: no event reached the local Heap" >&2
  cat "$work/relay.log" "$work/heap.jsonl" >&2
  exit 1
fi
grep '/api/track' "$work/heap.jsonl" | head -1
echo "first-run: a signed event reached the local Heap $(( $(date +%s) - started )) s after the start (build included)"
