#!/usr/bin/env bash
# Benchmarks of userpilot-heap-relay against a bare baseline server; writes BENCHMARKS.md.
#
#   bash bench/run.sh                  # the suite (release builds; a few minutes)
#   bash bench/run.sh --drain 1000000  # also time the drain of a 1,000,000-webhook backlog (long)
#   bash bench/run.sh --smoke          # seconds: debug builds, ~1 s of load, checks (CI)
#
# Other arguments go to `relay-bench suite` (see `relay-bench suite --help`: --runs,
# --duration, --concurrency, --rates, ...). Everything runs on loopback; servers are child
# processes of the harness and stop with it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One target folder for the relay and the harness, so their shared dependencies build once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

if [[ "${1:-}" == "--smoke" ]]; then
    cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
    cargo build --quiet --manifest-path "$ROOT/bench/Cargo.toml"
    exec "$CARGO_TARGET_DIR/debug/relay-bench" smoke \
        --relay-bin "$CARGO_TARGET_DIR/debug/userpilot-heap-relay"
fi

echo "== building (release)" >&2
cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
cargo build --release --manifest-path "$ROOT/bench/Cargo.toml"

commit="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
    commit="$commit (with uncommitted changes in src/)"
fi

exec "$CARGO_TARGET_DIR/release/relay-bench" suite \
    --relay-bin "$CARGO_TARGET_DIR/release/userpilot-heap-relay" \
    --commit "$commit" \
    --out "$ROOT/BENCHMARKS.md" \
    "$@"
