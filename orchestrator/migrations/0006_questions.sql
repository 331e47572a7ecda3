-- Operators drive tasks (docs/operations.md, "Driving tasks"): a task may be cancelled, and
-- workers' questions are kept until a person answers them.

ALTER TABLE tasks DROP CONSTRAINT tasks_state_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_state_check CHECK (state IN (
    'submitted', 'dev', 'qa', 'review', 'refactor', 'approved', 'merged',
    'failed', 'blocked', 'awaiting_approval', 'halted', 'cancelled'));

-- A worker's `question` envelope for a person. Open while `closed_at` is null; answering
-- it re-issues the task's step with the answer among the assignment's findings.
CREATE TABLE questions (
    -- The question envelope's id: delivering it twice records it once.
    id                uuid PRIMARY KEY,
    task_id           uuid NOT NULL REFERENCES tasks (id),
    asked_by_role     text NOT NULL,
    asked_by_instance text NOT NULL,
    -- Redacted, at most 2000 characters.
    text              text NOT NULL,
    asked_at          timestamptz NOT NULL DEFAULT now(),
    -- The assignment the worker was working on when it asked (its envelope's causation id).
    assignment_id     uuid,
    -- The answer (redacted), who gave it and when; a question closed without an answer
    -- (its task was cancelled) has `closed_at` and no `answer`.
    answer            text,
    answered_by       text,
    closed_at         timestamptz
);
CREATE INDEX questions_open ON questions (asked_at) WHERE closed_at IS NULL;
CREATE INDEX questions_task ON questions (task_id);
