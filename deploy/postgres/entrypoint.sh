#!/bin/sh
# The agentfleet/postgres image's entrypoint. On the first start (no PG_VERSION in
# $PGDATA) it creates the cluster with scram-sha-256 authentication and the superuser
# password from $POSTGRES_PASSWORD_FILE (a Docker or Kubernetes secret), then runs every
# *.sql file in $POSTGRES_INIT_DIR in single-user mode (roles, databases: see
# deploy/compose/). Then, and on every later start, it becomes the server, with the
# arguments given to the container (`-c ssl=on …`).
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_INIT_DIR:=/etc/agentfleet/postgres-init}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD_FILE:-}" ] || [ ! -r "$POSTGRES_PASSWORD_FILE" ]; then
        echo "postgres-entrypoint: set POSTGRES_PASSWORD_FILE to a readable file with the superuser's password" >&2
        exit 78
    fi
    initdb -D "$PGDATA" -U postgres --auth=scram-sha-256 --pwfile="$POSTGRES_PASSWORD_FILE" \
        --encoding=UTF8 --locale=C >&2
    for f in "$POSTGRES_INIT_DIR"/*.sql; do
        [ -r "$f" ] || continue
        echo "postgres-entrypoint: running $f" >&2
        postgres --single -D "$PGDATA" -j postgres <"$f" >/dev/null
    done
fi
# The socket goes to /tmp (a tmpfs under a read-only root); clients use TCP.
exec postgres -D "$PGDATA" -k /tmp "$@"
