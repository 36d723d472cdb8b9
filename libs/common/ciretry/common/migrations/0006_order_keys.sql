-- Attempt order keys of numeric job ids now carry the id after its value ("0:<value>:<id>"), so
-- that ids of equal value ("01", "1") sort as act sorts them (by their text). Read models only:
-- rewrite the keys stored before, so old and new rows compare the same way.
UPDATE audit_jobs
SET order_key = substr(order_key, 1, 32) || ':' || job_id || substr(order_key, 33)
WHERE order_key LIKE '0:%' AND substr(order_key, 33, 1) <> ':';
UPDATE audit_retries
SET order_key = substr(order_key, 1, 32) || ':' || job_id || substr(order_key, 33)
WHERE order_key LIKE '0:%' AND substr(order_key, 33, 1) <> ':';
