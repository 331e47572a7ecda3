-- Grants for the outbox relay's role: exactly what the relay's statements touch
-- (outbox-relay/src/outbox.rs and the LISTEN in src/relay.rs), nothing else. Run by an
-- operator, as the database owner (the role that ran `fleetctl db migrate`), after the
-- migrations, and again after any migration that changes the `outbox` table. Not a
-- migration, because the role's name and password belong to the deployment.
--
--   -- once, as a superuser or a role with CREATEROLE; pick your own name and password:
--   CREATE ROLE fleet_relay LOGIN PASSWORD '…';
--
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -f outbox-relay/sql/relay_role.sql
--   # a role with another name:
--   PGOPTIONS='-c fleet.relay_role=relay_prod' psql "$OWNER_URL" -v ON_ERROR_STOP=1 -f outbox-relay/sql/relay_role.sql
--
-- What the relay does, and the privilege each needs:
--   claim   SELECT id, txid, task_id, stream, frame, traceparent FROM outbox WHERE dispatched_at IS NULL
--           … FOR UPDATE SKIP LOCKED          SELECT on those columns; FOR UPDATE needs
--                                             UPDATE on at least one column
--   mark    UPDATE outbox SET dispatched_at = now() WHERE id = ANY($1)
--                                             UPDATE (dispatched_at)
--   prune   DELETE FROM outbox WHERE id IN (SELECT id … WHERE dispatched_at < …)
--                                             DELETE
--   wake    LISTEN fleet_outbox               nothing (the orchestrator's insert trigger notifies)
-- So the role may not insert rows (it cannot publish what the orchestrator did not write),
-- change a row's stream or frame, read `envelope_id` or `created_at`, or touch any other
-- table. The script is idempotent: it first takes back whatever the role held on `outbox`.
DO $$
DECLARE
    relay text := coalesce(nullif(current_setting('fleet.relay_role', true), ''), 'fleet_relay');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = relay) THEN
        RAISE EXCEPTION 'role "%" does not exist', relay
            USING HINT = format('Create it first: CREATE ROLE %I LOGIN PASSWORD ''…''', relay);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = relay AND rolsuper) THEN
        RAISE EXCEPTION 'role "%" is a superuser: the relay needs no more than its grants; use a plain LOGIN role', relay;
    END IF;

    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), relay);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), relay);
    EXECUTE format('REVOKE ALL ON outbox FROM %I', relay);
    EXECUTE format('GRANT SELECT (id, txid, task_id, stream, frame, traceparent, dispatched_at) ON outbox TO %I', relay);
    EXECUTE format('GRANT UPDATE (dispatched_at) ON outbox TO %I', relay);
    EXECUTE format('GRANT DELETE ON outbox TO %I', relay);
END $$;
