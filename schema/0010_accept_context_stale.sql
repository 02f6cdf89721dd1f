-- An inbound copy for a local agent is written with the agent and signing secret its process
-- remembered from an earlier accept (e2a.inbound), and its INSERT checks that they still hold
-- and that the copy has no stored duplicate. When either check fails, the INSERT calls this
-- function: the whole transaction is rolled back, nothing of it is written, and the accept
-- reads afresh. SQLSTATE E2A01: class E2 is not one PostgreSQL uses.
CREATE FUNCTION e2a_accept_context_stale(p_reason TEXT) RETURNS TEXT
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'the accept''s remembered context no longer holds (%)', p_reason USING ERRCODE = 'E2A01';
END
$$;
