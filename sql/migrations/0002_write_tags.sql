-- Write tags: each write made through the library records a tag (its write
-- id XOR the sequence number it produced) in the row, keeping the 64 most
-- recent. When a connection drops after a write was sent, the writer reads
-- the tags back and learns whether its write landed. A delete carries the
-- row's tags (and its own, when the deleting session set
-- trebuchet.write_id) into the tombstone, and a re-created actor continues
-- from there, so the history survives delete and re-create.
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS recent_writes BIGINT[];
ALTER TABLE {{tombstones}} ADD COLUMN IF NOT EXISTS recent_writes BIGINT[];

CREATE OR REPLACE FUNCTION {{function}}()
RETURNS TRIGGER AS $$
DECLARE
    tag BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        tag := NULLIF(current_setting('trebuchet.write_id', true), '')::BIGINT
            # (OLD.sequence_number + 1);
        INSERT INTO {{tombstones}} AS t (actor_id, sequence_number, recent_writes)
        VALUES (OLD.actor_id, OLD.sequence_number + 1,
            CASE WHEN tag IS NULL THEN OLD.recent_writes
                 ELSE (ARRAY[tag] || OLD.recent_writes)[1:64] END)
        ON CONFLICT (actor_id) DO UPDATE
            SET sequence_number = GREATEST(t.sequence_number, EXCLUDED.sequence_number),
                deleted_at = EXCLUDED.deleted_at,
                recent_writes = EXCLUDED.recent_writes;
        PERFORM pg_notify('{{channel}}',
            json_build_object(
                'actorID', OLD.actor_id,
                'sequenceNumber', OLD.sequence_number + 1,
                'timestamp', EXTRACT(EPOCH FROM NOW()),
                'op', 'delete'
            )::text
        );
        RETURN OLD;
    END IF;
    PERFORM pg_notify('{{channel}}',
        json_build_object(
            'actorID', NEW.actor_id,
            'sequenceNumber', NEW.sequence_number,
            'timestamp', EXTRACT(EPOCH FROM NEW.updated_at),
            'op', 'save'
        )::text
    );
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
