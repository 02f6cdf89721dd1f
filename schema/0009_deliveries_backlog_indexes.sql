-- An agent's backlog of pending jobs (mail that arrived while its webhook was down, say) must
-- not make every delivery, claim and accept for that agent read the whole backlog.
--
-- The live leases of an agent (the in-flight count of the claim, the hand-on, the accept's
-- read and e2a_webhook_slots_free) are the pending rows with a lease: a few per agent, found
-- here by agent and lease end. A row's lease is cleared when its attempt finishes.
CREATE INDEX deliveries_leased_idx ON deliveries (agent_id, leased_until)
    WHERE status = 'pending' AND leased_until IS NOT NULL;

-- The hand-on leases the agent's oldest due job: the agent's pending rows in due order, so the
-- scan stops at the first free one instead of sorting the backlog. Its prefix serves what the
-- index it replaces (schema/0002) served.
DROP INDEX deliveries_pending_agent_idx;
CREATE INDEX deliveries_pending_agent_idx ON deliveries (agent_id, next_attempt_at, id) WHERE status = 'pending';
