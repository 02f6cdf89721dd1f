-- The webhook claim counts each agent's in-flight (leased, pending) deliveries; without this
-- partial index that count also walks every delivered row of the agent.
CREATE INDEX deliveries_pending_agent_idx ON deliveries (agent_id) WHERE status = 'pending';
