-- A pooled connection keeps the plan it made at a statement's first execution until the next
-- ANALYZE, and on a new installation that first execution meets tables of a few rows. Two reads
-- of the delivery queue then read a whole backlog each time (docs/decisions.md, "Plans made
-- before the backlog"): they are written here so that the index made for each gives its order
-- and lets it stop early, the cheapest path whatever the plan was made on.
--
-- 1. The claim reads the due jobs in the order it leases them, (next_attempt_at, id), and stops
--    after a few (e2a.store.deliveries._CLAIM). With next_attempt_at alone in the index, a plan
--    made on a few rows sorted every due job instead. With id in the index the order is the
--    index's own. The counts served by its prefix (the due count, the per-agent backlog, the
--    gauges) read it as before, through a wider index.
DROP INDEX deliveries_due_idx;
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at, id) WHERE status = 'pending';

-- 2. The agent's live leases are read in lease order, which deliveries_leased_idx gives, at
--    most p_max of them (all a slot count needs: p_max or more means no free slot). As a plain
--    count, a plan made on a few rows counted through deliveries_pending_agent_idx and read the
--    agent's whole backlog under the agent's lock. Otherwise as in 0008.
CREATE OR REPLACE FUNCTION e2a_webhook_slots_free(p_agent TEXT, p_max INTEGER, p_now TIMESTAMPTZ, p_wait_ms INTEGER)
RETURNS INTEGER
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    leased INTEGER;
BEGIN
    IF NOT pg_try_advisory_xact_lock(1697800567, hashtext(p_agent)) THEN
        IF p_wait_ms IS NULL THEN
            PERFORM pg_advisory_xact_lock(1697800567, hashtext(p_agent));
        ELSIF p_wait_ms <= 0 THEN
            RETURN 0;
        ELSE
            PERFORM set_config('lock_timeout', p_wait_ms || 'ms', true);
            BEGIN
                PERFORM pg_advisory_xact_lock(1697800567, hashtext(p_agent));
            EXCEPTION WHEN lock_not_available THEN
                RETURN 0;
            END;
        END IF;
    END IF;
    SELECT (SELECT count(*) FROM (SELECT 1 FROM deliveries
                                  WHERE agent_id = p_agent AND status = 'pending' AND leased_until > p_now
                                  ORDER BY leased_until LIMIT GREATEST(p_max, 0)) live)
         + (SELECT count(*) FROM deliveries
            WHERE agent_id = p_agent AND status = 'paused' AND leased_until > p_now)
    INTO leased;
    RETURN GREATEST(p_max - leased, 0);
END
$$;
