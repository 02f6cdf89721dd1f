-- webhooks.max_concurrency_per_agent holds across processes and nodes (docs/decisions.md,
-- "The per-agent webhook limit across processes and nodes"). Every statement that leases a
-- job for an agent beyond the one it hands on (the claim, a job leased at accept) first asks
-- this function how many of the agent's slots are free. It takes the agent's
-- transaction-level advisory lock and then counts the live leases. Being VOLATILE PL/pgSQL,
-- its count runs on a snapshot taken after the lock was granted, so it sees every lease
-- committed by the lock's previous holder; the caller's own statement snapshot, taken before
-- the lock, would not. The lock is held until the caller's transaction ends, so no other
-- transaction counts the agent's leases until the ones taken here are committed.
-- p_wait_ms: how long to wait for the lock. NULL: as long as it takes (the accept, which
-- takes its agents' locks in one order, agent id bytewise, after every other write of its
-- transaction, so it never holds one while waiting for a row lock). A number: at most that
-- many milliseconds (the claim, which takes them in the same order), then no free slot.
-- Lock key: classid 0x65326177 ("e2aw"), objid hashtext(agent id).
--
-- Live leases are counted on pending rows and on paused ones: a 410 pauses the agent's other
-- jobs while their attempts are still in flight, and those attempts keep their leases.
CREATE INDEX deliveries_paused_agent_idx ON deliveries (agent_id) WHERE status = 'paused';

CREATE FUNCTION e2a_webhook_slots_free(p_agent TEXT, p_max INTEGER, p_now TIMESTAMPTZ, p_wait_ms INTEGER)
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
    SELECT (SELECT count(*) FROM deliveries
            WHERE agent_id = p_agent AND status = 'pending' AND leased_until > p_now)
         + (SELECT count(*) FROM deliveries
            WHERE agent_id = p_agent AND status = 'paused' AND leased_until > p_now)
    INTO leased;
    RETURN GREATEST(p_max - leased, 0);
END
$$;
