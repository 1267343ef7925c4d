-- Sequence numbers never repeat, and tables never cross on a shared channel.
--
-- A write that creates an actor takes its number from the tombstone as its
-- statement saw it. A delete of the same actor that commits while that write
-- waits for the row's lock leaves a tombstone the statement did not see, and
-- the row would start below it. The check below refuses such a row with
-- SQLSTATE 40001 (serialization_failure): nothing is written, and the
-- library runs the write again, which then continues above the tombstone.
-- Only rows written through the library are checked (it tags every row it
-- creates, so `recent_writes` is not NULL); other writers go on as before.
--
-- Every payload also names its table (`table`: the schema and the table's
-- name), so that tables may share a channel: a store's listener delivers
-- only its own table's changes. The seed's keys stay as they were.
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
        PERFORM pg_notify('{{channel}}',
            json_build_object(
                'actorID', OLD.actor_id,
                'sequenceNumber', OLD.sequence_number + 1,
                'timestamp', EXTRACT(EPOCH FROM NOW()),
                'op', 'delete',
                'table', TG_TABLE_SCHEMA || '.{{table_name}}'
            )::text
        );
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
    PERFORM pg_notify('{{channel}}',
        json_build_object(
            'actorID', NEW.actor_id,
            'sequenceNumber', NEW.sequence_number,
            'timestamp', EXTRACT(EPOCH FROM NEW.updated_at),
            'op', 'save',
            'table', TG_TABLE_SCHEMA || '.{{table_name}}'
        )::text
    );
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
