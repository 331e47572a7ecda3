-- When the outbox relay's own role, `fleet_relay`, exists before this migration runs (as
-- deploy/compose/setup.sh creates it), it gets exactly what the relay's statements touch,
-- the grants of outbox-relay/sql/relay_role.sql: read the outbox's columns, lock and mark
-- rows dispatched, prune them. Otherwise nothing happens here; run relay_role.sql once the
-- role exists (docs/deployment.md, "Postgres").
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_relay' AND NOT rolsuper) THEN
        GRANT SELECT (id, txid, task_id, stream, frame, dispatched_at) ON outbox TO fleet_relay;
        GRANT UPDATE (dispatched_at) ON outbox TO fleet_relay;
        GRANT DELETE ON outbox TO fleet_relay;
    END IF;
END
$$;
