#!/usr/bin/env bash
# Installs (from Debian's packages) and starts a local PostgreSQL for the Postgres queue tests,
# with a login role `relay` (password `relay`; may create databases; not a superuser, so the
# outage test can shut it out of a database) owning a database `relay`.
#
# Idempotent: safe when Postgres is already installed, running or set up. Use either way:
#   source .ci/postgres.sh            # exports the variables below into this shell
#   eval "$(bash .ci/postgres.sh)"    # the same, from its only output on stdout
# It exports RELAY_TEST_POSTGRES_URL (the tests' server) and RELAY_REQUIRE_POSTGRES=1 (the
# Postgres tests then fail instead of skipping if the URL goes missing). Progress goes to stderr.

_relay_postgres_setup() (
    set -euo pipefail
    log() { echo "postgres.sh: $*" >&2; }
    # shellcheck source=.ci/pg-cluster.sh
    source "$(dirname "${BASH_SOURCE[0]}")/pg-cluster.sh"

    # A throwaway cluster for tests: no fsync (the tests kill relays, never the machine), so
    # that creating a schema or a database per test stays cheap on a busy disk.
    port=$(pg_cluster_up main "" relay-tests.conf "fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200")

    as_postgres() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$port" "$@"; }
    as_postgres -d postgres >&2 <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay') THEN
        CREATE ROLE relay LOGIN PASSWORD 'relay' CREATEDB;
    ELSE
        ALTER ROLE relay LOGIN PASSWORD 'relay' CREATEDB NOSUPERUSER;
    END IF;
END
$$;
SQL
    if [ "$(as_postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'relay'")" != 1 ]; then
        as_postgres -d postgres -c "CREATE DATABASE relay OWNER relay" >&2
    fi

    url="postgres://relay:relay@127.0.0.1:${port}/relay"
    log "ready: $url"
    echo "$url"
)

if _relay_postgres_url=$(_relay_postgres_setup); then
    export RELAY_TEST_POSTGRES_URL="$_relay_postgres_url"
    export RELAY_REQUIRE_POSTGRES=1
    unset -f _relay_postgres_setup
    unset _relay_postgres_url
    echo "export RELAY_TEST_POSTGRES_URL=$RELAY_TEST_POSTGRES_URL RELAY_REQUIRE_POSTGRES=1"
else
    echo "postgres.sh: could not set up Postgres" >&2
    unset -f _relay_postgres_setup
    return 1 2>/dev/null || exit 1
fi
