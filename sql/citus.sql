-- On Citus (distributed PostgreSQL), after the migrations: what the tables
-- need to be distributed by actor_id. Applied by StateStore::migrate() on a
-- Citus coordinator, for any table and channel name; not on plain
-- PostgreSQL.
--
-- A statement on a distributed table is a router query (one shard, one
-- node) only when it reads no other shard's rows, so on Citus a write that
-- creates an actor does not read the tombstone itself: this trigger numbers
-- the row, on the node that holds the actor's shard, in the same
-- transaction. The library marks such a row by its sequence number: NULL
-- takes the number after the tombstone's (1 without one); a negative
-- number, -1 - n, takes n, unless the tombstone is at n or above, when the
-- row is skipped (not written: the statement answers nothing). A non-empty
-- recent_writes then holds the write's id alone; it becomes the write's
-- tag, followed by the tombstone's tags. Rows written any other way (a
-- number of 0 or more) pass unchanged.
CREATE OR REPLACE FUNCTION {{number_function}}()
RETURNS TRIGGER AS $$
DECLARE
    deleted_at_number BIGINT;
    tags BIGINT[];
    wanted BIGINT;
BEGIN
    IF NEW.sequence_number >= 0 THEN
        RETURN NEW;
    END IF;
    SELECT b.sequence_number, b.recent_writes INTO deleted_at_number, tags
        FROM {{tombstones}} b WHERE b.actor_id = NEW.actor_id;
    IF NEW.sequence_number IS NULL THEN
        NEW.sequence_number := COALESCE(deleted_at_number, 0) + 1;
    ELSE
        wanted := -1 - NEW.sequence_number;
        IF COALESCE(deleted_at_number, 0) >= wanted THEN
            RETURN NULL;
        END IF;
        NEW.sequence_number := wanted;
    END IF;
    IF cardinality(NEW.recent_writes) > 0 THEN
        NEW.recent_writes := (ARRAY[NEW.recent_writes[1] # NEW.sequence_number]
            || COALESCE(tags, '{}'::BIGINT[]))[1:64];
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS {{number_trigger}} ON {{table}};
CREATE TRIGGER {{number_trigger}}
    BEFORE INSERT ON {{table}}
    FOR EACH ROW EXECUTE FUNCTION {{number_function}}();

-- The change trigger, as the migrations made it: dropped while a table's
-- rows were copied into its shards, and made again here.
DROP TRIGGER IF EXISTS {{trigger}} ON {{table}};
CREATE TRIGGER {{trigger}}
    AFTER INSERT OR UPDATE OR DELETE ON {{table}}
    FOR EACH ROW EXECUTE FUNCTION {{function}}();
