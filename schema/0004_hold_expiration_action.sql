-- A hold keeps the expiration action its agent had when it was held (mail.md §8.1: changing an
-- agent's settings never affects messages already held). '' = a hold written before this
-- column existed: the expiry worker then falls back to the agent's current setting.
ALTER TABLE messages ADD COLUMN hitl_expiration_action TEXT NOT NULL DEFAULT ''
    CHECK (hitl_expiration_action IN ('', 'approve', 'reject'));
