-- agentfleet orchestrator schema. Applied by `orchestrator` at start and by `fleetctl db migrate`.
--
-- Roles: migrations run as the database owner. The orchestrator and the relay may connect as
-- a less privileged application role (orchestrator/sql/app_role.sql, docs/operations.md): it
-- gets INSERT/SELECT on the audit trail only, so it can neither change nor drop it nor its
-- triggers.

CREATE TABLE tasks (
    id              uuid PRIMARY KEY,
    state           text NOT NULL CHECK (state IN (
                        'submitted', 'dev', 'qa', 'review', 'refactor', 'approved', 'merged',
                        'failed', 'blocked', 'awaiting_approval', 'halted')),
    -- The state a side state (blocked, halted) returns to.
    resume_state    text CHECK (resume_state IN (
                        'submitted', 'dev', 'qa', 'review', 'refactor', 'approved', 'awaiting_approval')),
    title           text NOT NULL,
    spec            jsonb NOT NULL,
    risk            text NOT NULL DEFAULT 'LOW' CHECK (risk IN ('LOW', 'MEDIUM', 'HIGH', 'CRITICAL')),
    -- Attempt number of the current step's assignment (1 = first try).
    attempt         integer NOT NULL DEFAULT 0,
    -- Reassignments and QA→Dev loops used, against retries.max_per_task.
    retries         integer NOT NULL DEFAULT 0,
    -- Findings (QA, Review) that the next assignment carries back to Dev.
    findings        jsonb NOT NULL DEFAULT '[]',
    -- The envelope id of the current step's task.assign: results must answer it.
    assignment_id   uuid,
    assigned_to     text,
    -- A worker that stays silent past this loses the task (reassigned, or failed).
    deadline_at     timestamptz,
    -- Not before this time is the step (re)issued (exponential backoff between retries).
    not_before      timestamptz,
    submitted_by    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_state ON tasks (state);
CREATE INDEX tasks_deadline ON tasks (deadline_at) WHERE deadline_at IS NOT NULL;

CREATE TABLE task_events (
    seq         bigserial PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tasks (id),
    at          timestamptz NOT NULL DEFAULT now(),
    from_state  text,
    to_state    text NOT NULL,
    cause       text NOT NULL,
    -- The envelope that caused the transition; unique, so applying a result twice is a no-op.
    envelope_id uuid UNIQUE,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX task_events_task ON task_events (task_id, seq);

-- Transactional outbox. Rows are inserted in the same transaction as the state change; the
-- relay forwards `frame` (already signed) to `stream`. `txid` lets relays skip no row that a
-- slower transaction commits with a lower id (see outbox-relay).
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    txid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    stream        text NOT NULL,
    envelope_id   uuid NOT NULL UNIQUE,
    task_id       uuid,
    frame         bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz
);
CREATE INDEX outbox_undispatched ON outbox (txid, id) WHERE dispatched_at IS NULL;
CREATE INDEX outbox_dispatched ON outbox (dispatched_at) WHERE dispatched_at IS NOT NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fleet_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Append-only, hash-chained audit trail, partitioned by month. `seq` orders the chain across
-- partitions; `hash` = SHA-256 over prev_hash and the canonical row, `mac` = HMAC of hash
-- with the audit key (docs/operations.md#audit-trail).
CREATE TABLE audit_trail (
    seq            bigint NOT NULL,
    at             timestamptz NOT NULL,
    actor_role     text NOT NULL,
    actor_instance text NOT NULL,
    action         text NOT NULL,
    task_id        uuid,
    prompt_version text,
    details        jsonb NOT NULL,
    prev_hash      bytea NOT NULL,
    hash           bytea NOT NULL,
    mac            bytea NOT NULL,
    PRIMARY KEY (seq, at)
) PARTITION BY RANGE (at);

-- The chain's head: one row, locked by each append so the chain has one order.
CREATE TABLE audit_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq       bigint NOT NULL,
    hash      bytea NOT NULL
);
INSERT INTO audit_head (seq, hash) VALUES (0, '\x0000000000000000000000000000000000000000000000000000000000000000');

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_trail is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit_trail FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit_trail FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Creates the monthly partition holding `month` if missing (idempotent), and guards it
-- against TRUNCATE: Postgres clones the row triggers above onto each partition, but the
-- parent's statement trigger does not fire for `TRUNCATE audit_trail_YYYY_MM`.
--
-- Months are UTC months: the bounds are UTC midnights whatever the caller's TimeZone (they
-- would otherwise be read in the session's zone, and partitions made by sessions in
-- different zones would overlap or leave gaps). Pass a UTC date: `(now() AT TIME ZONE
-- 'UTC')::date`.
--
-- SECURITY DEFINER, because creating a partition takes the owner of audit_trail, and the
-- application role (orchestrator/sql/app_role.sql grants it EXECUTE) is not the owner; the
-- partitions belong to the owner too, so the application role cannot drop them. The
-- search_path is pinned below to the schema the migration ran in. The advisory lock
-- serializes concurrent callers (two orchestrators starting at once), which would
-- otherwise race in CREATE TABLE IF NOT EXISTS.
CREATE FUNCTION audit_ensure_partition(month date) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET TimeZone = 'UTC' AS $$
DECLARE
    lo date := date_trunc('month', month)::date;
    hi date := (date_trunc('month', month) + interval '1 month')::date;
    name text := format('audit_trail_%s', to_char(lo, 'YYYY_MM'));
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('audit_ensure_partition'));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_trail FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = format('%I', name)::regclass AND tgname = 'audit_no_truncate') THEN
        EXECUTE format('CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON %I FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()', name);
    END IF;
END $$;
DO $$ BEGIN
    EXECUTE format('ALTER FUNCTION audit_ensure_partition(date) SET search_path = %I, pg_temp', current_schema());
END $$;
REVOKE EXECUTE ON FUNCTION audit_ensure_partition(date) FROM PUBLIC;
SELECT audit_ensure_partition((now() AT TIME ZONE 'UTC')::date);
SELECT audit_ensure_partition((now() AT TIME ZONE 'UTC' + interval '1 month')::date);

CREATE TABLE artifacts (
    id         uuid PRIMARY KEY,
    task_id    uuid NOT NULL REFERENCES tasks (id),
    kind       text NOT NULL CHECK (kind IN ('diff', 'test_log', 'review', 'other')),
    name       text NOT NULL,
    sha256     bytea NOT NULL,
    content    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX artifacts_task ON artifacts (task_id);

CREATE TABLE approvals (
    id           uuid PRIMARY KEY,
    task_id      uuid NOT NULL REFERENCES tasks (id),
    requested_at timestamptz NOT NULL DEFAULT now(),
    decided_at   timestamptz,
    decided_by   text,
    decision     text CHECK (decision IN ('approved', 'rejected')),
    reason       text
);
CREATE INDEX approvals_task ON approvals (task_id);

-- Fleet-wide switches the orchestrator owns (the budget manager's kill state comes later).
CREATE TABLE fleet_state (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    kill_epoch bigint NOT NULL DEFAULT 0,
    halted     boolean NOT NULL DEFAULT false,
    changed_by text,
    reason     text,
    changed_at timestamptz
);
INSERT INTO fleet_state DEFAULT VALUES;
