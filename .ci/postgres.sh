#!/bin/sh
# Starts a real PostgreSQL server for the storage tests and prints its URL on stdout (all else
# goes to stderr). Installs Debian's postgresql package when it is missing. The server refuses to
# run as root, so it is a Debian cluster of its own ("herd", port $HERD_PG_PORT) that
# pg_ctlcluster runs as the postgres user; trust auth, listening on localhost only.
#
#   HERD_TEST_POSTGRES_URL=$(sh .ci/postgres.sh); export HERD_TEST_POSTGRES_URL
set -eu
PORT="${HERD_PG_PORT:-54329}"
CLUSTER=herd
DB=herd_test

log() { echo "postgres.sh: $*" >&2; }

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
VERSION="$(ls /usr/lib/postgresql | sort -n | tail -1)"

if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$VERSION $CLUSTER"; then
    log "creating cluster $VERSION/$CLUSTER on port $PORT"
    pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" -- --auth-local=trust --auth-host=trust >&2
fi
if ! pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
    log "starting cluster $VERSION/$CLUSTER"
    pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi
PORT="$(pg_conftool -s "$VERSION" "$CLUSTER" show port 2>/dev/null || echo "$PORT")"

i=0
until pg_isready -q -h 127.0.0.1 -p "$PORT"; do
    i=$((i + 1))
    if [ "$i" -gt 60 ]; then
        log "PostgreSQL did not come up on port $PORT"
        exit 1
    fi
    sleep 0.5
done

as_postgres() { su postgres -s /bin/sh -c "$1"; }
if [ "$(as_postgres "psql -p $PORT -Atc \"SELECT 1 FROM pg_database WHERE datname = '$DB'\"")" != 1 ]; then
    as_postgres "createdb -p $PORT $DB" >&2
fi
log "PostgreSQL $VERSION is serving $DB on 127.0.0.1:$PORT"
echo "postgresql://postgres@127.0.0.1:$PORT/$DB"
