-- Console sign-in links mailed through the outbound queue (docs/decisions.md, "Console:
-- sign-in link by mail"). Such a mail is e2a's own mail to an account, not any agent's: the
-- user may have no agent at all. It is a messages row of type 'signin' without an agent
-- (the relay worker, its retries and leases need nothing new); every other row keeps its agent.
ALTER TABLE messages ALTER COLUMN agent_id DROP NOT NULL;
ALTER TABLE messages ADD CONSTRAINT messages_agent_unless_signin CHECK (agent_id IS NOT NULL OR type = 'signin');
