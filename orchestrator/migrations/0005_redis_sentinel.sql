-- The value the orchestrator also keeps in Redis (`fleet:sentinel`). Redis answering
-- without it means Redis lost its data (a crash without a persisted AOF, a volume lost, a
-- fresh replica promoted): the orchestrator then re-issues every open step at once instead
-- of waiting for the step deadline (orchestrator/src/sentinel.rs).
ALTER TABLE fleet_state ADD COLUMN redis_sentinel text;
