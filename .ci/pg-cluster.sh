# Sourced by .ci/postgres.sh (the tests' cluster) and bench/postgres.sh (the benchmark's): one
# way to bring up a local PostgreSQL cluster from Debian's packages.
#
#   pg_cluster_up NAME PORT CONF SETTINGS
#
# Installs Postgres when it is missing; creates the newest version's cluster NAME when missing
# (on PORT, or the next free port when PORT is empty); writes SETTINGS to its
# conf.d/CONF, restarting the cluster when they changed; starts it; waits until it accepts
# connections; prints its port on stdout. Progress goes to stderr through `log`, which the
# caller defines. Meant for a `set -euo pipefail` subshell.

# Failures inside `$(pg_cluster_up ...)` must stop the caller too.
shopt -s inherit_errexit

pg_cluster_up() {
    local name=$1 port=$2 conf=$3 settings=$4 version conf_dir changed=0

    if ! command -v pg_lsclusters >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        log "installing postgresql"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq postgresql >&2
    fi

    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version $name"; then
        log "creating cluster $version/$name"
        pg_createcluster "$version" "$name" ${port:+--port "$port"} >&2
    fi

    conf_dir="/etc/postgresql/$version/$name/conf.d"
    if [ "$(cat "$conf_dir/$conf" 2>/dev/null)" != "$settings" ]; then
        mkdir -p "$conf_dir"
        printf '%s\n' "$settings" > "$conf_dir/$conf"
        changed=1
    fi
    if pg_lsclusters -h | awk -v v="$version" -v n="$name" '$1 == v && $2 == n {print $4}' | grep -q online; then
        if [ "$changed" = 1 ]; then
            log "restarting cluster $version/$name with the settings in $conf"
            pg_ctlcluster "$version" "$name" restart >&2
        fi
    else
        log "starting cluster $version/$name"
        pg_ctlcluster "$version" "$name" start >&2
    fi
    port=$(pg_lsclusters -h | awk -v v="$version" -v n="$name" '$1 == v && $2 == n {print $3}')

    for _ in $(seq 1 100); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.1
    done
    pg_isready -h 127.0.0.1 -p "$port" >&2
    echo "$port"
}
