-- The actor state table, as the seed defines it, with timestamps kept in UTC.
CREATE TABLE IF NOT EXISTS {{table}} (
    actor_id VARCHAR(255) PRIMARY KEY,
    state BYTEA NOT NULL,
    sequence_number BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC'),
    created_at TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC')
){{partition_by}};{{partitions}}

-- A table made by the seed's own script stored local time; store UTC from now on.
ALTER TABLE {{table}} ALTER COLUMN updated_at SET DEFAULT (NOW() AT TIME ZONE 'UTC');
ALTER TABLE {{table}} ALTER COLUMN created_at SET DEFAULT (NOW() AT TIME ZONE 'UTC');

CREATE INDEX IF NOT EXISTS {{idx_updated}} ON {{table}} (updated_at);
CREATE INDEX IF NOT EXISTS {{idx_sequence}} ON {{table}} (sequence_number);

-- The last sequence number of each deleted actor, so that an actor created
-- again under the same id continues above it: sequence numbers never repeat.
CREATE TABLE IF NOT EXISTS {{tombstones}} (
    actor_id VARCHAR(255) PRIMARY KEY,
    sequence_number BIGINT NOT NULL,
    deleted_at TIMESTAMP NOT NULL DEFAULT (NOW() AT TIME ZONE 'UTC')
);

-- Announces every change on the channel. The payload keeps the seed's keys
-- (actorID, sequenceNumber, timestamp as seconds since the Unix epoch, UTC)
-- and adds "op": "save" or "delete". A delete takes the next sequence number
-- and leaves a tombstone holding it.
CREATE OR REPLACE FUNCTION {{function}}()
RETURNS TRIGGER AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO {{tombstones}} AS t (actor_id, sequence_number)
        VALUES (OLD.actor_id, OLD.sequence_number + 1)
        ON CONFLICT (actor_id) DO UPDATE
            SET sequence_number = GREATEST(t.sequence_number, EXCLUDED.sequence_number),
                deleted_at = EXCLUDED.deleted_at;
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

DROP TRIGGER IF EXISTS {{trigger}} ON {{table}};
CREATE TRIGGER {{trigger}}
AFTER INSERT OR UPDATE OR DELETE ON {{table}}
FOR EACH ROW
EXECUTE FUNCTION {{function}}();
