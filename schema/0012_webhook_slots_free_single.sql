-- Databases that reached version 8 under an earlier text of 0008_webhook_slots_free.sql (it
-- changed while in development, and a database records only a migration's number) can hold
-- versions of e2a_webhook_slots_free that 0011 did not replace: one with three arguments, or
-- one whose fourth is a boolean. With the boolean one present, PostgreSQL cannot choose between
-- it and 0011's for a call whose fourth argument is an untyped NULL. Those databases also lack
-- the index that 0008 now makes. Here both are put right; on any other database this changes
-- nothing.
DROP FUNCTION IF EXISTS e2a_webhook_slots_free(TEXT, INTEGER, TIMESTAMPTZ);
DROP FUNCTION IF EXISTS e2a_webhook_slots_free(TEXT, INTEGER, TIMESTAMPTZ, BOOLEAN);
CREATE INDEX IF NOT EXISTS deliveries_paused_agent_idx ON deliveries (agent_id) WHERE status = 'paused';
