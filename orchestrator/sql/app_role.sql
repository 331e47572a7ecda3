-- Grants for the application role: the less privileged role the orchestrator connects as
-- (with `migrate_on_start = false`). The outbox relay has a role of its own with far less,
-- outbox-relay/sql/relay_role.sql. Run by an operator, as the database owner (the role that ran the
-- migrations), after `fleetctl db migrate`, and again after every migration that adds a
-- table. Not a migration, because the role's name and password belong to the deployment.
--
--   -- once, as a superuser or a role with CREATEROLE; pick your own name and password:
--   CREATE ROLE fleet_app LOGIN PASSWORD '…';
--
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -f orchestrator/sql/app_role.sql
--   # a role with another name:
--   PGOPTIONS='-c fleet.app_role=orch_prod' psql "$OWNER_URL" -v ON_ERROR_STOP=1 -f orchestrator/sql/app_role.sql
--
-- The role may read and write the task tables, read and move the audit head, and read and
-- append to the audit trail. It is not the owner of anything, so it cannot UPDATE, DELETE
-- or TRUNCATE audit rows (no privilege; the triggers refuse even the owner), drop or
-- detach a partition, drop or disable the triggers, or replace their function. It may call
-- audit_ensure_partition (SECURITY DEFINER) so the orchestrator can create next month's
-- partition itself. It needs no grant on the partitions: rows inserted and read through
-- audit_trail are checked against audit_trail's privileges only. The script is idempotent:
-- it first takes back whatever the role held on the audit tables.
DO $$
DECLARE
    app text := coalesce(nullif(current_setting('fleet.app_role', true), ''), 'fleet_app');
    part regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = app) THEN
        RAISE EXCEPTION 'role "%" does not exist', app
            USING HINT = format('Create it first: CREATE ROLE %I LOGIN PASSWORD ''…''', app);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = app AND rolsuper) THEN
        RAISE EXCEPTION 'role "%" is a superuser: it could disable the audit triggers; use a plain LOGIN role', app;
    END IF;

    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), app);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), app);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON tasks, task_events, outbox, artifacts, approvals, fleet_state, questions, incidents, incident_tasks TO %I', app);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO %I', current_schema(), app);

    EXECUTE format('REVOKE ALL ON audit_head, audit_trail FROM %I', app);
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'audit_trail'::regclass LOOP
        EXECUTE format('REVOKE ALL ON %s FROM %I', part, app);
    END LOOP;
    EXECUTE format('GRANT SELECT, UPDATE ON audit_head TO %I', app);
    EXECUTE format('GRANT SELECT, INSERT ON audit_trail TO %I', app);
    EXECUTE format('GRANT EXECUTE ON FUNCTION audit_ensure_partition(date) TO %I', app);
END $$;
