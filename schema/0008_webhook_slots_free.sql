-- webhooks.max_concurrency_per_agent holds across processes and nodes (docs/decisions.md,
-- "The per-agent webhook limit across processes and nodes"). Every statement that leases a
-- job for an agent beyond the one it hands on (the claim, a job leased at accept) first asks
-- this function how many of the agent's slots are free. It takes the agent's
-- transaction-level advisory lock and then counts the live leases. Being VOLATILE PL/pgSQL,
-- its count runs on a snapshot taken after the lock was granted, so it sees every lease
-- committed by the lock's previous holder; the caller's own statement snapshot, taken before
-- the lock, would not. The lock is held until the caller's transaction ends, so no other
-- transaction counts the agent's leases until the ones taken here are committed.
-- p_wait: wait for the lock (the accept, which takes its agents' locks in one order, agent id
-- bytewise, after every other write of its transaction, so it never holds one while waiting
-- for a row lock), or only try it and report no free slot when it is busy (the claim, which
-- therefore never waits and can be part of no deadlock).
-- Lock key: classid 0x65326177 ("e2aw"), objid hashtext(agent id).
CREATE FUNCTION e2a_webhook_slots_free(p_agent TEXT, p_max INTEGER, p_now TIMESTAMPTZ, p_wait BOOLEAN)
RETURNS INTEGER
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    leased INTEGER;
BEGIN
    IF p_wait THEN
        PERFORM pg_advisory_xact_lock(1697800567, hashtext(p_agent));
    ELSIF NOT pg_try_advisory_xact_lock(1697800567, hashtext(p_agent)) THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO leased FROM deliveries
    WHERE agent_id = p_agent AND status = 'pending' AND leased_until > p_now;
    RETURN GREATEST(p_max - leased, 0);
END
$$;
