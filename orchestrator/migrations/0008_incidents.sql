-- Incidents (docs/incident-response.md): opened by an operator or automatically (a secret
-- in an approved change, a suspicious sandbox kill, a burst of refusals from one sender, a
-- failed audit verify, a budget kill). A critical or high one freezes automatic merges,
-- fleet-wide (`repository` null) or for one repository, until an admin resolves it.

CREATE TABLE incidents (
    id            uuid PRIMARY KEY,
    severity      text NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    -- What opened it: `operator`, or the automatic trigger's name.
    trigger       text NOT NULL,
    -- Redacted, 1 to 200 characters.
    title         text NOT NULL,
    -- The trigger's figures (sender, counts, finding, …), redacted.
    details       jsonb NOT NULL DEFAULT '{}',
    -- The repository whose merges it freezes; null: every repository (when it freezes).
    repository    text,
    -- Whether pushes wait until it is resolved (critical and high).
    freezes_merges boolean NOT NULL,
    -- Automatic triggers open one incident per cause while it is open, not one per event.
    dedup_key     text,
    opened_by     text NOT NULL,
    opened_at     timestamptz NOT NULL DEFAULT now(),
    resolved_by   text,
    resolved_at   timestamptz,
    -- Redacted, what was done about it.
    resolution    text,
    CHECK ((resolved_at IS NULL) = (resolved_by IS NULL))
);
CREATE UNIQUE INDEX incidents_open_dedup ON incidents (dedup_key) WHERE resolved_at IS NULL AND dedup_key IS NOT NULL;
CREATE INDEX incidents_open ON incidents (opened_at) WHERE resolved_at IS NULL;

-- Tasks an incident concerns: the task that caused it, and the fix task it sent to Refactor.
CREATE TABLE incident_tasks (
    incident_id uuid NOT NULL REFERENCES incidents (id),
    task_id     uuid NOT NULL REFERENCES tasks (id),
    link        text NOT NULL CHECK (link IN ('cause', 'fix')),
    linked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (incident_id, task_id)
);
CREATE INDEX incident_tasks_task ON incident_tasks (task_id);

-- A fix task jumps the queue: the tick issues due steps by priority first (0 normal, 1
-- critical).
ALTER TABLE tasks ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority IN (0, 1));

-- The anchoring process (`fleetctl audit anchor --every`) anchors at once when an
-- incident opens, not only at its interval.
CREATE FUNCTION incidents_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fleet_incident', NEW.id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER incidents_notify AFTER INSERT ON incidents FOR EACH ROW EXECUTE FUNCTION incidents_notify();
