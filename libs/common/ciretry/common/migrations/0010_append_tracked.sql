-- Group commit with tracking rows (issue 20): the outputs of several consumed events, each unit
-- with its own tracking row, in one transaction and one round trip (EventStore.append_tracked).
-- A unit whose tracking row exists already stores nothing and fails nothing else.
--
-- Input: append_events' event columns (keys already free of repeats: the caller resolves
-- those), the unit (1-based) of each event, and per unit its tracking row (consumer NULL: none).
-- Output: append_events' rows (ord counts the input events, as there), and one row per unit
-- whose tracking row existed: ord = the unit, duplicate NULL, the rest NULL.
CREATE FUNCTION append_tracked_events(
    p_lock            bigint,
    p_event_ids       uuid[],
    p_streams         text[],
    p_types           text[],
    p_schema_versions int2[],
    p_bodies          bytea[],
    p_metadata        bytea[],
    p_keys            text[],
    p_units           int4[],
    p_consumers       text[],
    p_tracked         uuid[]
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
    done int4[];
BEGIN
    -- Tracking rows before the lock (as append_events: a redelivery waiting on another's
    -- uncommitted row holds no lock meanwhile), in one order, so that two group commits
    -- sharing rows wait for each other rather than deadlock.
    WITH wanted AS (
        SELECT t.unit::int4 AS unit, t.consumer, t.tracked
        FROM unnest(p_consumers, p_tracked) WITH ORDINALITY AS t(consumer, tracked, unit)
        WHERE t.consumer IS NOT NULL
    ),
    ins AS (
        INSERT INTO tracking (consumer, event_id)
        SELECT w.consumer, w.tracked FROM wanted w ORDER BY w.consumer, w.tracked
        ON CONFLICT DO NOTHING
        RETURNING tracking.consumer, tracking.event_id
    )
    SELECT coalesce(array_agg(w.unit), '{}') INTO done
    FROM wanted w
    WHERE NOT EXISTS (
        SELECT 1 FROM ins i WHERE i.consumer = w.consumer AND i.event_id = w.tracked
    );

    IF EXISTS (SELECT 1 FROM unnest(p_units) AS u(unit) WHERE u.unit <> ALL (done)) THEN
        PERFORM pg_advisory_xact_lock(p_lock);
    END IF;

    -- As append_events (0003), over the events of the units not already processed.
    RETURN QUERY
    WITH input AS (
        SELECT t.event_id, t.stream, t.type, t.schema_version, t.body, t.metadata,
               t.idempotency_key, t.n::int4 AS ord
        FROM unnest(p_event_ids, p_streams, p_types, p_schema_versions, p_bodies, p_metadata,
                    p_keys, p_units) WITH ORDINALITY
             AS t(event_id, stream, type, schema_version, body, metadata, idempotency_key, unit,
                  n)
        WHERE t.unit <> ALL (done)
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
    FROM existing x
    UNION ALL
    SELECT d.unit, NULL::boolean, NULL::bigint, NULL::timestamptz, NULL::int4,
           NULL::uuid, NULL::text, NULL::text, NULL::int2, NULL::bytea, NULL::bytea
    FROM unnest(done) AS d(unit);
END;
$$;
