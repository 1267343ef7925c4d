-- Expiry: a save may give its state a time to live. A row whose expires_at
-- (UTC) has passed reads as absent at once; the sweeper deletes it later,
-- through the trigger, so that the removal is announced as a delete. A save
-- without a time to live sets it back to NULL.
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS expires_at TIMESTAMP;

-- Only rows that expire are indexed: the sweeper finds them here, and a
-- save that leaves expires_at NULL changes no key of this index.
CREATE INDEX IF NOT EXISTS {{idx_expires}} ON {{table}} (expires_at)
    WHERE expires_at IS NOT NULL;
