"""What act's ``run_due`` read before the ``pending_requests`` read model (issue 13): every
``RetryRequested`` ever stored after $1 without a final outcome, with its transient failures
counted from the log, $2 at a time. The oracle the read model is checked against
(tests/act/test_pending.py) and the cost it is compared with (bench/pending.py)."""

from __future__ import annotations

PENDING_FROM_THE_LOG = """
SELECT r.position, r.idempotency_key, r.type, r.schema_version, r.body,
       (SELECT count(*) FROM events f
         WHERE f.stream = r.stream AND f.type = 'RetryFailed'
           AND left(f.idempotency_key, length(r.idempotency_key) + 8)
               = r.idempotency_key || ':failed:') AS failures,
       (SELECT max(f.recorded_at) FROM events f
         WHERE f.stream = r.stream AND f.type = 'RetryFailed'
           AND left(f.idempotency_key, length(r.idempotency_key) + 8)
               = r.idempotency_key || ':failed:') AS last_failure
FROM events r
WHERE r.type = 'RetryRequested' AND r.position > $1
  AND NOT EXISTS (SELECT 1 FROM events o WHERE o.idempotency_key = r.idempotency_key || ':outcome')
ORDER BY r.position
LIMIT $2
"""
