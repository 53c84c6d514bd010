#!/usr/bin/env bash
# A CPU profile of the relay's ingest path: one release relay on a fresh SQLite queue (forwarder
# paused, Heap unreachable, so nothing but ingest runs), a closed loop from `relay-bench load`,
# and `perf record` with DWARF call graphs on the relay for a window in the middle of it.
#
#   bash bench/profile.sh [RELAY_BIN] [IN_FLIGHT] [SECONDS]   # defaults: this build, 32, 8
#
# Writes target/profile/perf.data and prints the split by thread and the heaviest call paths
# (inclusive). Needs `perf` (Debian's linux-perf) and kernel.perf_event_paranoid ≤ 2. The
# throughput it prints is lower than the suite's: perf's unwinding costs the relay CPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
bin="${1:-$CARGO_TARGET_DIR/release/userpilot-heap-relay}"
in_flight="${2:-32}"
seconds="${3:-8}"
out="$CARGO_TARGET_DIR/profile"

command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 2; }
if [[ -z "${1:-}" ]]; then
    cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
fi
cargo build --quiet --release --manifest-path "$ROOT/bench/Cargo.toml"

rm -rf "$out"
mkdir -p "$out"
port=$((20000 + RANDOM % 20000))
token=profile-token-profile-token
export RELAY_SERVER__LISTEN="127.0.0.1:$port" RELAY_SERVER__ADMIN_LISTEN="127.0.0.1:$((port + 1))"
export RELAY_HEAP__BASE_URL=http://127.0.0.1:9 RELAY_QUEUE__PATH="$out/queue.sqlite3"
export RELAY_ADMIN__TOKEN="$token" RELAY_LOG__LEVEL=warn
export RELAY_USERPILOT__SECRETS=bench-secret RELAY_HEAP__APP_ID=12345

"$bin" serve >"$out/relay.log" 2>&1 &
relay=$!
trap 'kill "$relay" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.1
done
curl -sf -X POST -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$((port + 1))/admin/forwarder/pause" >/dev/null

"$CARGO_TARGET_DIR/release/relay-bench" load --url "http://127.0.0.1:$port/webhooks/userpilot" \
    --secret bench-secret --concurrency "$in_flight" --duration $((seconds + 4)) --warmup 1 \
    --requests 400000 --pid "$relay" >"$out/load.json" &
load=$!
sleep 2
perf record -F 400 --call-graph dwarf,16384 -p "$relay" -o "$out/perf.data" -- sleep "$seconds" \
    2>"$out/perf.log" >/dev/null
wait "$load"

echo "== load (with perf attached part of the time)"
grep -E '"(completed|throughput|p99_ms|server_cpu_s)"' "$out/load.json"
echo "== CPU by thread"
perf report -i "$out/perf.data" --no-children --sort comm -g none -q --stdio 2>/dev/null | grep -v '^$'
echo "== heaviest call paths, inclusive (async plumbing left out)"
perf report -i "$out/perf.data" --children --sort sym -g none -q --stdio 2>/dev/null |
    grep -v '^$' | grep -vE 'poll|closure|thread_start|start_thread|clone3|0xffff|call_once|backtrace|enter_runtime|Scoped' |
    head -60
