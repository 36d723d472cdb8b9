-- Issue 13: followers catch up from the log, and act's open requests as a read model, so that
-- neither reads the whole log again and again as it grows.

-- Each follower's low-water mark: every event of its types at or below `position` has a
-- tracking row (ciretry.common.catchup). Moved up in batches by the follower's catch-up, which
-- one replica at a time runs: the one holding the lease (owner, until).
CREATE TABLE follower_positions (
    consumer    text        PRIMARY KEY,
    position    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner uuid,
    lease_until timestamptz
);

-- act's open requests: a row while a RetryRequested has no final outcome, gone when it gets one.
-- Kept by the trigger below in the transaction that appends the events, from the `type` and
-- `idempotency_key` columns alone: a request's key is K, its final outcome's K:outcome
-- (RetryIssued, final RetryFailed, or the RetrySkipped closing a dry run), a transient failure's
-- K:failed:<n>. act's run_due reads this table instead of every RetryRequested ever stored.
CREATE TABLE pending_requests (
    request_key  text        PRIMARY KEY,
    position     bigint      NOT NULL UNIQUE,   -- the RetryRequested event
    failures     integer     NOT NULL DEFAULT 0,
    last_failure timestamptz
);

CREATE FUNCTION pending_requests_follow() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    request text;
BEGIN
    IF NEW.type = 'RetryRequested' THEN
        -- (An outcome can only follow its request; the check keeps a hand-made log honest.)
        INSERT INTO pending_requests (request_key, position)
        SELECT NEW.idempotency_key, NEW.position
        WHERE NOT EXISTS (
            SELECT 1 FROM events o WHERE o.idempotency_key = NEW.idempotency_key || ':outcome')
        ON CONFLICT DO NOTHING;
    ELSIF right(NEW.idempotency_key, 8) = ':outcome' THEN
        DELETE FROM pending_requests WHERE request_key = left(NEW.idempotency_key, -8);
    ELSIF NEW.type = 'RetryFailed' THEN
        request := substring(NEW.idempotency_key FROM '^(.*):failed:[0-9]+$');
        IF request IS NOT NULL THEN
            UPDATE pending_requests
            SET failures = failures + 1,
                last_failure = greatest(last_failure, NEW.recorded_at)
            WHERE request_key = request;
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- Fires only for act's event types with a key (the WHEN is checked without calling the
-- function): ingest's appends pay nothing for it. Taking the trigger's lock on `events` also
-- waits for appends in flight, so the backfill below sees every event committed before it.
CREATE TRIGGER events_pending_requests AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.type IN ('RetryRequested', 'RetryIssued', 'RetryFailed', 'RetrySkipped')
          AND NEW.idempotency_key IS NOT NULL)
    EXECUTE FUNCTION pending_requests_follow();

-- Backfill from the log as it stands (once; the trigger keeps it from now on).
INSERT INTO pending_requests (request_key, position, failures, last_failure)
SELECT r.idempotency_key, r.position, coalesce(f.n, 0), f.last
FROM events r
LEFT JOIN (
    SELECT substring(idempotency_key FROM '^(.*):failed:[0-9]+$') AS request,
           count(*) AS n, max(recorded_at) AS last
    FROM events
    WHERE type = 'RetryFailed' AND idempotency_key LIKE '%:failed:%'
    GROUP BY 1
) f ON f.request = r.idempotency_key
WHERE r.type = 'RetryRequested' AND r.idempotency_key IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM events o WHERE o.idempotency_key = r.idempotency_key || ':outcome')
ON CONFLICT DO NOTHING;

-- A poison message rejected before this migration has its MessageRejected but no tracking row;
-- from now on the rejection commits one (handled: the catch-up must not take it up again).
-- The rejected event's id is in the rejection's idempotency key: rejected:<consumer>:<id>.
INSERT INTO tracking (consumer, event_id)
SELECT m[1], m[2]::uuid
FROM events e,
     regexp_match(e.idempotency_key,
                  '^rejected:([^:]+):([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$')
         AS m
WHERE e.type = 'MessageRejected' AND m IS NOT NULL
ON CONFLICT DO NOTHING;
