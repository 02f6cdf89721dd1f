-- Ties an outbound relay lease to the claim that took it (mail.md §7.8): every guarded write
-- (lease renewal, in-doubt marker, outcome) must present the token, so a worker whose lease ran
-- out while its session was still alive can no longer overwrite the new owner's state or send.
ALTER TABLE outbound_recipients ADD COLUMN lease_token TEXT;
