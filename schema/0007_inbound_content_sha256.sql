-- RFC 1047 duplicate suppression compares the received content too (docs/decisions.md,
-- "Duplicate suppression"): SHA-256 (hex) of the DATA content as received, before e2a adds
-- its trace and auth headers. NULL (rows stored before this column, internal mail) never
-- matches, so such a row is never taken for the original of a resend.
ALTER TABLE messages ADD COLUMN content_sha256 TEXT;
