#!/usr/bin/env bash
# A durable local PostgreSQL for the benchmarks: its own cluster `bench` (port 5434 unless
# RELAY_BENCH_POSTGRES_PORT says otherwise), separate from the tests' cluster `main`, which
# .ci/postgres.sh runs without fsync. Here the durability settings are Postgres's defaults,
# written out so that nothing else can turn them off: fsync, synchronous_commit and
# full_page_writes on, so a 202 from the relay follows a commit flushed to disk, as with SQLite.
# A login role `relay_bench` (password `relay_bench`; may create databases; may read settings
# such as data_directory; may end other sessions on its database) for the harness, which
# creates and drops its own database (`relay_bench`) and connects to `postgres` to do so.
#
# Installs Postgres from Debian's packages when it is missing. Idempotent: safe when Postgres
# is already installed, running or set up. Use either way:
#   source bench/postgres.sh            # exports RELAY_BENCH_POSTGRES_URL into this shell
#   eval "$(bash bench/postgres.sh)"    # the same, from its only output on stdout
# `relay-bench suite` reads RELAY_BENCH_POSTGRES_URL (or --postgres URL); bench/run.sh calls
# this script itself. Progress goes to stderr. Stop the cluster with
#   pg_ctlcluster <version> bench stop

_relay_bench_postgres_setup() (
    set -euo pipefail
    log() { echo "bench/postgres.sh: $*" >&2; }
    # shellcheck source=.ci/pg-cluster.sh
    source "$(dirname "${BASH_SOURCE[0]}")/../.ci/pg-cluster.sh"

    # Durable, as Postgres ships. (The default 100 connections are plenty: the harness runs one
    # relay on Postgres at a time, and a relay keeps at most 17.)
    port=$(pg_cluster_up bench "${RELAY_BENCH_POSTGRES_PORT:-5434}" relay-bench.conf "fsync = on
synchronous_commit = on
full_page_writes = on")

    as_postgres() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$port" "$@"; }
    as_postgres -d postgres >&2 <<'SQL'
SET client_min_messages = warning;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay_bench') THEN
        CREATE ROLE relay_bench LOGIN PASSWORD 'relay_bench' CREATEDB;
    ELSE
        ALTER ROLE relay_bench LOGIN PASSWORD 'relay_bench' CREATEDB NOSUPERUSER;
    END IF;
END
$$;
GRANT pg_read_all_settings TO relay_bench;
-- So that `DROP DATABASE ... WITH (FORCE)` may also end a session on the database that this
-- role does not own (an autovacuum worker after the ingest runs, most likely): without it the
-- suite stopped once at "must be a member of the role whose process is being terminated or
-- member of pg_signal_backend".
GRANT pg_signal_backend TO relay_bench;
SQL

    url="postgres://relay_bench:relay_bench@127.0.0.1:${port}/postgres"
    log "ready: $url"
    echo "$url"
)

if _relay_bench_postgres_url=$(_relay_bench_postgres_setup); then
    export RELAY_BENCH_POSTGRES_URL="$_relay_bench_postgres_url"
    unset -f _relay_bench_postgres_setup
    unset _relay_bench_postgres_url
    echo "export RELAY_BENCH_POSTGRES_URL=$RELAY_BENCH_POSTGRES_URL"
else
    echo "bench/postgres.sh: could not set up Postgres" >&2
    unset -f _relay_bench_postgres_setup
    return 1 2>/dev/null || exit 1
fi
