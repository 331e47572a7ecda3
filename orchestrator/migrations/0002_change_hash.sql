-- The change a task is about, by content address (lowercase hex SHA-256 of the diff's
-- bytes, as in artifacts.sha256), and which change QA passed and Review approved. The
-- orchestrator pushes only when all three are the same change.
ALTER TABLE tasks
    ADD COLUMN change_sha256          text CHECK (change_sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN qa_passed_sha256       text CHECK (qa_passed_sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN review_approved_sha256 text CHECK (review_approved_sha256 ~ '^[0-9a-f]{64}$');
