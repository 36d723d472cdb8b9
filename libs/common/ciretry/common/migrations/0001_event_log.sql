-- The append-only event log, its outbox and the followers' tracking table.
-- Tables are created in the current search_path schema (one per deployment or per test).

CREATE TABLE events (
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    stream          text        NOT NULL,
    stream_version  integer     NOT NULL CHECK (stream_version >= 1),
    type            text        NOT NULL,
    schema_version  smallint    NOT NULL,
    body            bytea       NOT NULL,
    metadata        bytea       NOT NULL,
    idempotency_key text,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_stream_version_key UNIQUE (stream, stream_version)
);
CREATE UNIQUE INDEX events_idempotency_key ON events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX events_type_position ON events (type, position);
CREATE INDEX events_recorded_at ON events (recorded_at);

-- Append-only, enforced by the database: the trigger stops even the table owner, and the
-- privileges stop any role that is granted only SELECT/INSERT.
CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON events FROM PUBLIC;

-- Outbox: one row per appended event, committed with it, deleted once JetStream has it.
CREATE TABLE outbox (
    position    bigint      PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Tracking: a consumer's processing of an event commits with its outputs; the primary key makes
-- a redelivered event a no-op (exactly-once in effect).
CREATE TABLE tracking (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, event_id)
);
