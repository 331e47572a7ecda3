-- A lease belongs to one worker instance, not to its role (issue 10, item 3).
--
-- `assigned_to` used to name the instance that last sent a heartbeat. It now names the
-- instance the current assignment is bound to: the first tool request, heartbeat or result
-- naming the assignment sets it, only while it is empty (one UPDATE ... WHERE assigned_to IS
-- NULL OR assigned_to = <sender>), and every new assignment clears it. Envelopes from any
-- other instance are refused (`lease_bound_elsewhere`) and audited. No data changes: a
-- value written by the old heartbeat is the instance that was working on the step.
COMMENT ON COLUMN tasks.assigned_to IS
    'Worker instance the current assignment is bound to (first use binds; others are refused). NULL: unbound.';
