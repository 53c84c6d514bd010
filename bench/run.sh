#!/usr/bin/env bash
# Benchmarks of userpilot-heap-relay against a bare baseline server; writes BENCHMARKS.md.
#
#   bash bench/run.sh                  # the suite (release builds; a few minutes)
#   bash bench/run.sh --drain 1000000  # also drain a 1,000,000-webhook backlog at --drain-limit
#                                      # events/min (default 600000), ingesting meanwhile (long)
#   bash bench/run.sh --no-postgres    # the suite without the relay on Postgres
#   bash bench/run.sh --sources        # first argument: only the cost of routing, 1 source
#                                      # against 10 sources over 3 app ids (a few minutes);
#                                      # prints its section, also written to
#                                      # target/bench-sources.md (its figures: .json)
#   bash bench/run.sh --transforms     # first argument: only the cost of transforms, one relay
#                                      # with no program, `.` and a reshaping program on three
#                                      # sources, CPU per webhook (about a minute); prints its
#                                      # section, also written to target/bench-transforms.md
#                                      # (its figures: .json)
#   bash bench/run.sh --erase          # first argument: only the cost of an erasure, one person
#                                      # with 10,000 stored webhooks among 40,000 others erased
#                                      # while webhooks are posted at 1,000/s, against the same
#                                      # load without an erasure (a few minutes); prints its
#                                      # section, also written to target/bench-erase.md (its
#                                      # figures: .json)
#   bash bench/run.sh --compare OLD_BIN  # first argument: only the storage path, an old relay
#                                      # binary against the current one (built in release here):
#                                      # 3 runs alternating which goes first, each on a fresh
#                                      # SQLite queue, forwarder paused: closed loop at 32 and
#                                      # 128 in flight, a queue grown to 200,000 webhooks at
#                                      # 2,000/s, stored bytes per webhook; the baseline in the
#                                      # same runs (several minutes); prints its section, also
#                                      # written to target/bench-compare.md (its figures: .json).
#                                      # Copy OLD_BIN out of target/ first: this build overwrites
#                                      # target/release/userpilot-heap-relay.
#   bash bench/run.sh --smoke          # seconds: debug builds, ~1 s of load, checks (CI)
#   target/release/relay-bench drain --relay-bin BIN [--old-bin OLD]
#                                      # (after a build) only the drain of a backlog (200,000
#                                      # webhooks by default) released at --limit events/min,
#                                      # nothing ingested meanwhile; an old binary alternating
#                                      # with the new (a minute or two per drain; --help)
#
# Postgres: when Postgres is installed (`pg_lsclusters` and a server binary exist), the suite
# also measures ingest with the relay's queue on Postgres, on a durable cluster `bench` that
# bench/postgres.sh creates and starts (port 5434; fsync and synchronous_commit on). It does
# not install Postgres (run `bash bench/postgres.sh` once to do that). `--no-postgres` skips
# it; `--postgres URL` or RELAY_BENCH_POSTGRES_URL picks another server (its role must be
# allowed to create databases; the suite works in its own database `relay_bench`). The smoke
# run includes the relay on Postgres when RELAY_TEST_POSTGRES_URL is set (as in CI, from
# .ci/postgres.sh), in a database of its own (`relay_bench_smoke`).
#
# Other arguments go to `relay-bench suite` (see `relay-bench suite --help`: --runs,
# --duration, --concurrency, --rates, --out, --no-sources, ...), or with --sources to
# `relay-bench sources` (`relay-bench sources --help`: --runs, --concurrency, --rates, --out,
# --json, ...), or with --transforms to `relay-bench transforms` (--runs, --duration,
# --concurrency, ...), or with --erase to `relay-bench erase` (--runs, --stored, --others,
# --rate, --window, ...), or with --compare to `relay-bench compare` (--runs, --duration,
# --warmup, --concurrency, --grown, --rate, --old-label, ...). The sections that only
# --erase and --compare measure are pasted into BENCHMARKS.md by hand; the suite keeps them
# when it writes the file again. The suite includes the routing comparison; `--no-sources` skips it (for a relay
# build that does not route by source). Everything runs on loopback; servers are child
# processes of the harness and stop with it (Postgres, a service, keeps running).
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

commit() {
    local commit
    commit="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
        commit="$commit (with uncommitted changes in src/)"
    fi
    echo "$commit"
}

if [[ "${1:-}" == "--sources" ]]; then
    # Only the routing comparison; the other arguments go to `relay-bench sources`.
    shift
    echo "== building (release)" >&2
    cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
    cargo build --release --manifest-path "$ROOT/bench/Cargo.toml"
    exec "$CARGO_TARGET_DIR/release/relay-bench" sources \
        --relay-bin "$CARGO_TARGET_DIR/release/userpilot-heap-relay" \
        --commit "$(commit)" \
        --out "$CARGO_TARGET_DIR/bench-sources.md" \
        --json "$CARGO_TARGET_DIR/bench-sources.json" \
        "$@"
fi

if [[ "${1:-}" == "--transforms" ]]; then
    # Only the transforms comparison; the other arguments go to `relay-bench transforms`.
    shift
    echo "== building (release)" >&2
    cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
    cargo build --release --manifest-path "$ROOT/bench/Cargo.toml"
    exec "$CARGO_TARGET_DIR/release/relay-bench" transforms \
        --relay-bin "$CARGO_TARGET_DIR/release/userpilot-heap-relay" \
        --commit "$(commit)" \
        --out "$CARGO_TARGET_DIR/bench-transforms.md" \
        --json "$CARGO_TARGET_DIR/bench-transforms.json" \
        "$@"
fi

if [[ "${1:-}" == "--erase" ]]; then
    # Only the erasure measurement; the other arguments go to `relay-bench erase`.
    shift
    echo "== building (release)" >&2
    cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
    cargo build --release --manifest-path "$ROOT/bench/Cargo.toml"
    exec "$CARGO_TARGET_DIR/release/relay-bench" erase \
        --relay-bin "$CARGO_TARGET_DIR/release/userpilot-heap-relay" \
        --commit "$(commit)" \
        --out "$CARGO_TARGET_DIR/bench-erase.md" \
        --json "$CARGO_TARGET_DIR/bench-erase.json" \
        "$@"
fi

if [[ "${1:-}" == "--compare" ]]; then
    # Only old against new; the other arguments go to `relay-bench compare`.
    shift
    old_bin="${1:-}"
    if [[ -z "$old_bin" || ! -f "$old_bin" ]]; then
        echo "run.sh --compare OLD_BIN: give the old relay binary (a release build)" >&2
        exit 2
    fi
    shift
    old_bin="$(realpath "$old_bin")"
    new_bin="$CARGO_TARGET_DIR/release/userpilot-heap-relay"
    if [[ "$old_bin" == "$(realpath -m "$new_bin")" ]]; then
        echo "run.sh --compare: $old_bin is the binary this build writes; copy it elsewhere first" >&2
        exit 2
    fi
    echo "== building (release)" >&2
    cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
    cargo build --release --manifest-path "$ROOT/bench/Cargo.toml"
    exec "$CARGO_TARGET_DIR/release/relay-bench" compare \
        --old-bin "$old_bin" \
        --new-bin "$new_bin" \
        --commit "$(commit)" \
        --out "$CARGO_TARGET_DIR/bench-compare.md" \
        --json "$CARGO_TARGET_DIR/bench-compare.json" \
        "$@"
fi

args=()
postgres=auto
out=(--out "$ROOT/BENCHMARKS.md")
for arg in "$@"; do
    case "$arg" in
        --no-postgres) postgres=no ;;
        --postgres | --postgres=*) postgres=given; args+=("$arg") ;;
        --out | --out=*) out=(); args+=("$arg") ;;
        *) args+=("$arg") ;;
    esac
done
if [[ "$postgres" == no ]]; then
    unset RELAY_BENCH_POSTGRES_URL
elif [[ "$postgres" == auto && -z "${RELAY_BENCH_POSTGRES_URL:-}" ]]; then
    if command -v pg_lsclusters >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        echo "== postgres (bench/postgres.sh; --no-postgres skips it)" >&2
        # shellcheck source=bench/postgres.sh
        source "$ROOT/bench/postgres.sh" >/dev/null ||
            { echo "run.sh: Postgres could not be set up; --no-postgres skips it" >&2; exit 1; }
    else
        echo "== postgres: not installed, not measured (bash bench/postgres.sh installs it)" >&2
    fi
fi

echo "== building (release)" >&2
cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin userpilot-heap-relay
cargo build --release --manifest-path "$ROOT/bench/Cargo.toml"

exec "$CARGO_TARGET_DIR/release/relay-bench" suite \
    --relay-bin "$CARGO_TARGET_DIR/release/userpilot-heap-relay" \
    --commit "$(commit)" \
    ${out[@]+"${out[@]}"} \
    ${args[@]+"${args[@]}"}
