-- A writer may announce its changes itself: with `trebuchet.announce` set
-- to `off` in its transaction, the trigger keeps the tombstones and the
-- checks but sends no notification. On Citus, a write that spans shards
-- commits in two phases, which a transaction that ran NOTIFY on a worker
-- cannot; the library then announces each row from the coordinator in the
-- same transaction. Nothing else sets it: every other write is announced
-- as before.
CREATE OR REPLACE FUNCTION {{function}}()
RETURNS TRIGGER AS $$
DECLARE
    tag BIGINT;
    deleted_at_number BIGINT;
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
        IF current_setting('trebuchet.announce', true) IS DISTINCT FROM 'off' THEN
            PERFORM pg_notify('{{channel}}',
                json_build_object(
                    'actorID', OLD.actor_id,
                    'sequenceNumber', OLD.sequence_number + 1,
                    'timestamp', EXTRACT(EPOCH FROM NOW()),
                    'op', 'delete',
                    'table', TG_TABLE_SCHEMA || '.{{table_name}}'
                )::text
            );
        END IF;
        RETURN OLD;
    END IF;
    IF TG_OP = 'INSERT' AND NEW.recent_writes IS NOT NULL THEN
        -- A statement of its own, so it sees every delete committed so far.
        SELECT b.sequence_number INTO deleted_at_number
            FROM {{tombstones}} b WHERE b.actor_id = NEW.actor_id;
        IF deleted_at_number >= NEW.sequence_number THEN
            RAISE EXCEPTION 'actor % was deleted at sequence number % while it was being written at %',
                NEW.actor_id, deleted_at_number, NEW.sequence_number
                USING ERRCODE = 'serialization_failure',
                      HINT = 'run the write again: it continues above the deleted number';
        END IF;
    END IF;
    IF current_setting('trebuchet.announce', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_notify('{{channel}}',
            json_build_object(
                'actorID', NEW.actor_id,
                'sequenceNumber', NEW.sequence_number,
                'timestamp', EXTRACT(EPOCH FROM NEW.updated_at),
                'op', 'save',
                'table', TG_TABLE_SCHEMA || '.{{table_name}}'
            )::text
        );
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
