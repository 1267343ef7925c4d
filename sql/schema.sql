-- trebuchet-postgres schema for the default table and channel.
--
-- Generated from sql/migrations/ (do not edit by hand). Usable as a
-- docker-entrypoint-initdb.d script; StateStore::migrate() applies the same
-- statements, for any table and channel name, and records the version.
-- Compatible with the seed's schema: same table, columns, channel and
-- payload keys; deletes are announced too.

-- The actor state table, as the seed defines it, with timestamps kept in UTC.
CREATE TABLE IF NOT EXISTS "actor_states" (
    actor_id VARCHAR(255) PRIMARY KEY,
    state BYTEA NOT NULL,
    sequence_number BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC'),
    created_at TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC')
);

-- A table made by the seed's own script stored local time; store UTC from now on.
ALTER TABLE "actor_states" ALTER COLUMN updated_at SET DEFAULT (NOW() AT TIME ZONE 'UTC');
ALTER TABLE "actor_states" ALTER COLUMN created_at SET DEFAULT (NOW() AT TIME ZONE 'UTC');

CREATE INDEX IF NOT EXISTS "idx_actor_states_updated" ON "actor_states" (updated_at);
CREATE INDEX IF NOT EXISTS "idx_actor_states_sequence" ON "actor_states" (sequence_number);

-- The last sequence number of each deleted actor, so that an actor created
-- again under the same id continues above it: sequence numbers never repeat.
CREATE TABLE IF NOT EXISTS "actor_states_tombstones" (
    actor_id VARCHAR(255) PRIMARY KEY,
    sequence_number BIGINT NOT NULL,
    deleted_at TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC')
);

-- Announces every change on the channel. The payload keeps the seed's keys
-- (actorID, sequenceNumber, timestamp as seconds since the Unix epoch, UTC)
-- and adds "op": "save" or "delete". A delete takes the next sequence number
-- and leaves a tombstone holding it.
CREATE OR REPLACE FUNCTION "notify_actor_state_change"()
RETURNS TRIGGER AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO "actor_states_tombstones" AS t (actor_id, sequence_number)
        VALUES (OLD.actor_id, OLD.sequence_number + 1)
        ON CONFLICT (actor_id) DO UPDATE
            SET sequence_number = GREATEST(t.sequence_number, EXCLUDED.sequence_number),
                deleted_at = EXCLUDED.deleted_at;
        PERFORM pg_notify('actor_state_changes',
            json_build_object(
                'actorID', OLD.actor_id,
                'sequenceNumber', OLD.sequence_number + 1,
                'timestamp', EXTRACT(EPOCH FROM NOW()),
                'op', 'delete'
            )::text
        );
        RETURN OLD;
    END IF;
    PERFORM pg_notify('actor_state_changes',
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

DROP TRIGGER IF EXISTS "actor_state_change_trigger" ON "actor_states";
CREATE TRIGGER "actor_state_change_trigger"
AFTER INSERT OR UPDATE OR DELETE ON "actor_states"
FOR EACH ROW
EXECUTE FUNCTION "notify_actor_state_change"();

-- Write tags: each write made through the library records a tag (its write
-- id XOR the sequence number it produced) in the row, keeping the 64 most
-- recent. When a connection drops after a write was sent, the writer reads
-- the tags back and learns whether its write landed. A delete carries the
-- row's tags (and its own, when the deleting session set
-- trebuchet.write_id) into the tombstone, and a re-created actor continues
-- from there, so the history survives delete and re-create.
ALTER TABLE "actor_states" ADD COLUMN IF NOT EXISTS recent_writes BIGINT[];
ALTER TABLE "actor_states_tombstones" ADD COLUMN IF NOT EXISTS recent_writes BIGINT[];

CREATE OR REPLACE FUNCTION "notify_actor_state_change"()
RETURNS TRIGGER AS $$
DECLARE
    tag BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        tag := NULLIF(current_setting('trebuchet.write_id', true), '')::BIGINT
            # (OLD.sequence_number + 1);
        INSERT INTO "actor_states_tombstones" AS t (actor_id, sequence_number, recent_writes)
        VALUES (OLD.actor_id, OLD.sequence_number + 1,
            CASE WHEN tag IS NULL THEN OLD.recent_writes
                 ELSE (ARRAY[tag] || OLD.recent_writes)[1:64] END)
        ON CONFLICT (actor_id) DO UPDATE
            SET sequence_number = GREATEST(t.sequence_number, EXCLUDED.sequence_number),
                deleted_at = EXCLUDED.deleted_at,
                recent_writes = EXCLUDED.recent_writes;
        PERFORM pg_notify('actor_state_changes',
            json_build_object(
                'actorID', OLD.actor_id,
                'sequenceNumber', OLD.sequence_number + 1,
                'timestamp', EXTRACT(EPOCH FROM NOW()),
                'op', 'delete'
            )::text
        );
        RETURN OLD;
    END IF;
    PERFORM pg_notify('actor_state_changes',
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

-- Expiry: a save may give its state a time to live. A row whose expires_at
-- (UTC) has passed reads as absent at once; the sweeper deletes it later,
-- through the trigger, so that the removal is announced as a delete. A save
-- without a time to live sets it back to NULL.
ALTER TABLE "actor_states" ADD COLUMN IF NOT EXISTS expires_at TIMESTAMP;

-- Only rows that expire are indexed: the sweeper finds them here, and a
-- save that leaves expires_at NULL changes no key of this index.
CREATE INDEX IF NOT EXISTS "idx_actor_states_expires" ON "actor_states" (expires_at)
    WHERE expires_at IS NOT NULL;

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
CREATE OR REPLACE FUNCTION "notify_actor_state_change"()
RETURNS TRIGGER AS $$
DECLARE
    tag BIGINT;
    deleted_at_number BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        tag := NULLIF(current_setting('trebuchet.write_id', true), '')::BIGINT
            # (OLD.sequence_number + 1);
        INSERT INTO "actor_states_tombstones" AS t (actor_id, sequence_number, recent_writes)
        VALUES (OLD.actor_id, OLD.sequence_number + 1,
            CASE WHEN tag IS NULL THEN OLD.recent_writes
                 ELSE (ARRAY[tag] || OLD.recent_writes)[1:64] END)
        ON CONFLICT (actor_id) DO UPDATE
            SET sequence_number = GREATEST(t.sequence_number, EXCLUDED.sequence_number),
                deleted_at = EXCLUDED.deleted_at,
                recent_writes = EXCLUDED.recent_writes;
        PERFORM pg_notify('actor_state_changes',
            json_build_object(
                'actorID', OLD.actor_id,
                'sequenceNumber', OLD.sequence_number + 1,
                'timestamp', EXTRACT(EPOCH FROM NOW()),
                'op', 'delete',
                'table', TG_TABLE_SCHEMA || '.actor_states'
            )::text
        );
        RETURN OLD;
    END IF;
    IF TG_OP = 'INSERT' AND NEW.recent_writes IS NOT NULL THEN
        -- A statement of its own, so it sees every delete committed so far.
        SELECT b.sequence_number INTO deleted_at_number
            FROM "actor_states_tombstones" b WHERE b.actor_id = NEW.actor_id;
        IF deleted_at_number >= NEW.sequence_number THEN
            RAISE EXCEPTION 'actor % was deleted at sequence number % while it was being written at %',
                NEW.actor_id, deleted_at_number, NEW.sequence_number
                USING ERRCODE = 'serialization_failure',
                      HINT = 'run the write again: it continues above the deleted number';
        END IF;
    END IF;
    PERFORM pg_notify('actor_state_changes',
        json_build_object(
            'actorID', NEW.actor_id,
            'sequenceNumber', NEW.sequence_number,
            'timestamp', EXTRACT(EPOCH FROM NEW.updated_at),
            'op', 'save',
            'table', TG_TABLE_SCHEMA || '.actor_states'
        )::text
    );
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

-- A writer may announce its changes itself: with `trebuchet.announce` set
-- to `off` in its transaction, the trigger keeps the tombstones and the
-- checks but sends no notification. On Citus, a write that spans shards
-- commits in two phases, which a transaction that ran NOTIFY on a worker
-- cannot; the library then announces each row from the coordinator in the
-- same transaction. Nothing else sets it: every other write is announced
-- as before.
CREATE OR REPLACE FUNCTION "notify_actor_state_change"()
RETURNS TRIGGER AS $$
DECLARE
    tag BIGINT;
    deleted_at_number BIGINT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        tag := NULLIF(current_setting('trebuchet.write_id', true), '')::BIGINT
            # (OLD.sequence_number + 1);
        INSERT INTO "actor_states_tombstones" AS t (actor_id, sequence_number, recent_writes)
        VALUES (OLD.actor_id, OLD.sequence_number + 1,
            CASE WHEN tag IS NULL THEN OLD.recent_writes
                 ELSE (ARRAY[tag] || OLD.recent_writes)[1:64] END)
        ON CONFLICT (actor_id) DO UPDATE
            SET sequence_number = GREATEST(t.sequence_number, EXCLUDED.sequence_number),
                deleted_at = EXCLUDED.deleted_at,
                recent_writes = EXCLUDED.recent_writes;
        IF current_setting('trebuchet.announce', true) IS DISTINCT FROM 'off' THEN
            PERFORM pg_notify('actor_state_changes',
                json_build_object(
                    'actorID', OLD.actor_id,
                    'sequenceNumber', OLD.sequence_number + 1,
                    'timestamp', EXTRACT(EPOCH FROM NOW()),
                    'op', 'delete',
                    'table', TG_TABLE_SCHEMA || '.actor_states'
                )::text
            );
        END IF;
        RETURN OLD;
    END IF;
    IF TG_OP = 'INSERT' AND NEW.recent_writes IS NOT NULL THEN
        -- A statement of its own, so it sees every delete committed so far.
        SELECT b.sequence_number INTO deleted_at_number
            FROM "actor_states_tombstones" b WHERE b.actor_id = NEW.actor_id;
        IF deleted_at_number >= NEW.sequence_number THEN
            RAISE EXCEPTION 'actor % was deleted at sequence number % while it was being written at %',
                NEW.actor_id, deleted_at_number, NEW.sequence_number
                USING ERRCODE = 'serialization_failure',
                      HINT = 'run the write again: it continues above the deleted number';
        END IF;
    END IF;
    IF current_setting('trebuchet.announce', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_notify('actor_state_changes',
            json_build_object(
                'actorID', NEW.actor_id,
                'sequenceNumber', NEW.sequence_number,
                'timestamp', EXTRACT(EPOCH FROM NEW.updated_at),
                'op', 'save',
                'table', TG_TABLE_SCHEMA || '.actor_states'
            )::text
        );
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
