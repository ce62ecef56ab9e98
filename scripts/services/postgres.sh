#!/usr/bin/env bash
# A private PostgreSQL cluster for tests and CI: start|stop|env.
#
# One cluster per machine, in $PHP_RUN_PG_DIR (default /var/tmp/php-run-postgres), owned by the
# postgres user and listening on 127.0.0.1 only, on a free port chosen at initdb time. `start` reuses
# a running cluster (so several checkouts share one) and records in .services/ that this checkout
# started it; `stop` stops it only when this checkout started it. Both write .services/postgres.env. Durability is switched off
# (fsync, synchronous_commit, full_page_writes): this cluster holds throw-away test databases.
set -euo pipefail
cd "$(dirname "$0")/../.."

PG_DIR=${PHP_RUN_PG_DIR:-/var/tmp/php-run-postgres}
STATE=.services
DATA=$PG_DIR/data

# From / : the postgres user may not enter the checkout (a private temporary folder, say).
as_postgres() { (cd / && runuser -u postgres -- "$@"); }

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $dir ]] && echo "$dir"
}

install_postgres() {
    if [[ -z $(pg_bin) ]]; then
        echo "postgres: installing the postgresql package" >&2
        if ! apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends postgresql >/dev/null; then
            apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
            apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends postgresql >/dev/null
        fi
    fi
}

running() { [[ -f $DATA/postmaster.pid ]] && as_postgres "$(pg_bin)/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

init_cluster() {
    install -d -o postgres -g postgres -m 700 "$PG_DIR"
    local password
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    echo "$password" > "$PG_DIR/password"
    chmod 600 "$PG_DIR/password"
    chown postgres:postgres "$PG_DIR/password"
    as_postgres "$(pg_bin)/initdb" -D "$DATA" -U postgres --pwfile="$PG_DIR/password" \
        --auth-host=scram-sha-256 --auth-local=peer -E UTF8 >/dev/null
    cat >> "$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $(free_port)
unix_socket_directories = '$PG_DIR'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
}

write_env() {
    local port password
    port=$(sed -n "s/^port = \([0-9]*\)$/\1/p" "$DATA/postgresql.conf" | tail -n 1)
    password=$(cat "$PG_DIR/password")
    mkdir -p "$STATE"
    echo "export PHP_RUN_TEST_PG_URL=postgresql+psycopg://postgres:$password@127.0.0.1:$port/postgres" > "$STATE/postgres.env"
}

start() {
    install_postgres
    if running; then
        echo "postgres: reusing the cluster running in $DATA" >&2
    else
        [[ -f $DATA/PG_VERSION ]] || init_cluster
        as_postgres "$(pg_bin)/pg_ctl" -D "$DATA" -l "$PG_DIR/server.log" -w -t 60 start >/dev/null
        mkdir -p "$STATE"
        echo "$PG_DIR" > "$STATE/postgres.started"
        echo "postgres: started the cluster in $DATA" >&2
    fi
    write_env
}

stop() {
    if [[ -f $STATE/postgres.started && $(cat "$STATE/postgres.started") == "$PG_DIR" ]] && running; then
        as_postgres "$(pg_bin)/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
        echo "postgres: stopped" >&2
    fi
    rm -f "$STATE/postgres.started" "$STATE/postgres.env"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
