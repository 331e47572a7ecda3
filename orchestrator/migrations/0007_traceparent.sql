-- Traces (docs/observability.md). A task is one trace: `tasks.traceparent` is the W3C trace
-- context of the span that accepted it (continuing the submitter's `traceparent` header),
-- the parent of every envelope the orchestrator enqueues for the task outside a span of its
-- own (re-issued assignments, the push). `outbox.traceparent` is the context each row's
-- envelope carries, so the relay's forwarding span joins the same trace without reading
-- the signed frame. Both are NULL when tracing is off.
ALTER TABLE tasks ADD COLUMN traceparent text;
ALTER TABLE outbox ADD COLUMN traceparent text;

-- The relay reads the new column (outbox-relay/sql/relay_role.sql grants the same).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_relay' AND NOT rolsuper) THEN
        GRANT SELECT (traceparent) ON outbox TO fleet_relay;
    END IF;
END
$$;
