-- One round trip per append: EventStore.append_batch calls this function as a single statement
-- (its own transaction), instead of BEGIN, tracking insert, lock, idempotency lookup, version
-- lookup, insert and COMMIT each waiting for the previous answer.
--
-- Input: the events to store, in order, already free of idempotency keys repeated inside the
-- batch (the caller resolves those to their first occurrence). Output, one row per input that
-- was stored (event_id, position, recorded_at, stream_version; the rest NULL: the caller matches
-- it by event_id) and one per input whose idempotency key was already stored (ord, 1-based, and
-- the stored event's columns, duplicate = true).
--
-- Errors (the transaction, tracking row included, is rolled back):
--   CR001 wrong expected version, DETAIL = JSON [stream, expected, actual]
--   CR002 tracking row exists (the consumer already processed the event)
--
-- The statements run one after the other inside the function, each with a fresh snapshot (READ
-- COMMITTED, VOLATILE function), so the version lookup after the advisory lock sees everything
-- the previous lock holder committed: a single CTE could not, its snapshot predates the lock.
CREATE FUNCTION append_events(
    p_lock            bigint,
    p_event_ids       uuid[],
    p_streams         text[],
    p_types           text[],
    p_schema_versions int2[],
    p_bodies          bytea[],
    p_metadata        bytea[],
    p_keys            text[],
    p_expected        text[],
    p_expected_vers   int4[],
    p_tracking        text,
    p_tracking_event  uuid
) RETURNS TABLE (
    ord            int4,
    duplicate      boolean,
    "position"     bigint,
    recorded_at    timestamptz,
    stream_version int4,
    event_id       uuid,
    stream         text,
    type           text,
    schema_version int2,
    body           bytea,
    metadata       bytea
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    bad record;
BEGIN
    IF p_tracking IS NOT NULL THEN
        INSERT INTO tracking (consumer, event_id) VALUES (p_tracking, p_tracking_event)
            ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'already processed' USING ERRCODE = 'CR002';
        END IF;
    END IF;

    PERFORM pg_advisory_xact_lock(p_lock);

    IF cardinality(p_expected) > 0 THEN
        SELECT x.s, x.want, x.have INTO bad
        FROM (
            SELECT u.s, u.want,
                   coalesce((SELECT max(e.stream_version) FROM events e WHERE e.stream = u.s), 0)
                       AS have
            FROM unnest(p_expected, p_expected_vers) AS u(s, want)
        ) x
        WHERE x.have <> x.want
        LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'wrong expected version'
                USING ERRCODE = 'CR001', DETAIL = json_build_array(bad.s, bad.want, bad.have)::text;
        END IF;
    END IF;

    RETURN QUERY
    WITH input AS (
        SELECT t.*, t.n::int4 AS ord
        FROM unnest(p_event_ids, p_streams, p_types, p_schema_versions, p_bodies, p_metadata,
                    p_keys) WITH ORDINALITY
             AS t(event_id, stream, type, schema_version, body, metadata, idempotency_key, n)
    ),
    stored AS MATERIALIZED (  -- index scan on the keys, never a scan of the log
        SELECT e.* FROM events e WHERE e.idempotency_key = ANY(p_keys)
    ),
    existing AS (
        SELECT i.ord, e.*
        FROM stored e JOIN input i ON i.idempotency_key = e.idempotency_key
    ),
    fresh AS (
        SELECT i.* FROM input i WHERE NOT EXISTS (SELECT 1 FROM existing x WHERE x.ord = i.ord)
    ),
    base AS (
        SELECT s.stream,
               coalesce((SELECT max(e.stream_version) FROM events e WHERE e.stream = s.stream), 0)
                   AS version
        FROM (SELECT DISTINCT f.stream FROM fresh f) s
    ),
    numbered AS (
        SELECT f.*, (b.version + row_number() OVER (PARTITION BY f.stream ORDER BY f.ord))::int4
                   AS stream_version
        FROM fresh f JOIN base b ON b.stream = f.stream
    ),
    ins AS (
        INSERT INTO events (event_id, stream, stream_version, type, schema_version, body,
                            metadata, idempotency_key)
        SELECT n.event_id, n.stream, n.stream_version, n.type, n.schema_version, n.body,
               n.metadata, n.idempotency_key
        FROM numbered n ORDER BY n.ord
        RETURNING events.event_id, events.position, events.recorded_at, events.stream_version
    ),
    ob AS (
        INSERT INTO outbox (position) SELECT ins.position FROM ins
    )
    SELECT NULL::int4, false, ins.position, ins.recorded_at, ins.stream_version,
           ins.event_id, NULL::text, NULL::text, NULL::int2, NULL::bytea, NULL::bytea
    FROM ins
    UNION ALL
    SELECT x.ord, true, x.position, x.recorded_at, x.stream_version,
           x.event_id, x.stream, x.type, x.schema_version, x.body, x.metadata
    FROM existing x;
END;
$$;

-- The outbox fast path's delete, committed without waiting for the WAL flush: a delete lost in
-- a crash only makes the sweeper publish those events again, and JetStream (Nats-Msg-Id) or
-- the consumers' tracking rows drop the repeat. The append it follows stays synchronous.
CREATE FUNCTION outbox_delete(p_positions bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM outbox WHERE position = ANY(p_positions);
END;
$$;
