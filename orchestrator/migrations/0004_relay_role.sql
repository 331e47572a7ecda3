-- The outbox relay may connect as a role of its own, `outbox_relay`, with exactly what it
-- needs: read outbox rows (and lock them: FOR UPDATE needs UPDATE on some column), mark
-- them dispatched and prune them. Create the role before the first migration runs
-- (docs/deployment.md); without it nothing is granted here, and the relay must be granted
-- these by hand.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_relay') THEN
        GRANT SELECT, UPDATE (dispatched_at), DELETE ON outbox TO outbox_relay;
    END IF;
END
$$;
