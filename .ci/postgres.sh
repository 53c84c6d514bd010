#!/usr/bin/env bash
# Installs (from Debian's packages) and starts a local PostgreSQL for the Postgres queue tests,
# with a login role `relay` (password `relay`; may create databases; not a superuser, so the
# outage test can shut it out of a database) owning a database `relay`; and, for the erasure
# test's raw-page check (contract §12: no tuple of a schema's tables may hold an erased
# identity), the `pageinspect` extension in `relay` and a login superuser `relay_inspector`
# (password `relay_inspector`), since only a superuser may read raw pages.
#
# Idempotent: safe when Postgres is already installed, running or set up. Use either way:
#   source .ci/postgres.sh            # exports the variables below into this shell
#   eval "$(bash .ci/postgres.sh)"    # the same, from its only output on stdout
# It exports RELAY_TEST_POSTGRES_URL (the tests' server), RELAY_TEST_POSTGRES_INSPECT_URL (the
# same database as `relay_inspector`) and RELAY_REQUIRE_POSTGRES=1 (the Postgres tests then fail
# instead of skipping if the URL goes missing). Progress goes to stderr.

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
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay_inspector') THEN
        CREATE ROLE relay_inspector LOGIN SUPERUSER PASSWORD 'relay_inspector';
    ELSE
        ALTER ROLE relay_inspector LOGIN SUPERUSER PASSWORD 'relay_inspector';
    END IF;
END
$$;
SQL
    if [ "$(as_postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'relay'")" != 1 ]; then
        as_postgres -d postgres -c "CREATE DATABASE relay OWNER relay" >&2
    fi
    as_postgres -d relay -c "CREATE EXTENSION IF NOT EXISTS pageinspect" >&2

    url="postgres://relay:relay@127.0.0.1:${port}/relay"
    inspect_url="postgres://relay_inspector:relay_inspector@127.0.0.1:${port}/relay"
    log "ready: $url (raw pages: $inspect_url)"
    echo "$url $inspect_url"
)

if _relay_postgres_urls=$(_relay_postgres_setup); then
    export RELAY_TEST_POSTGRES_URL="${_relay_postgres_urls%% *}"
    export RELAY_TEST_POSTGRES_INSPECT_URL="${_relay_postgres_urls#* }"
    export RELAY_REQUIRE_POSTGRES=1
    unset -f _relay_postgres_setup
    unset _relay_postgres_urls
    echo "export RELAY_TEST_POSTGRES_URL=$RELAY_TEST_POSTGRES_URL" \
        "RELAY_TEST_POSTGRES_INSPECT_URL=$RELAY_TEST_POSTGRES_INSPECT_URL RELAY_REQUIRE_POSTGRES=1"
else
    echo "postgres.sh: could not set up Postgres" >&2
    unset -f _relay_postgres_setup
    return 1 2>/dev/null || exit 1
fi
