-- Failure signatures and their outcomes (issue 15), read models of the audit: the clusters of
-- failures by signature that `/api/v1/clusters`, the "Unexplained failures" page and
-- `ciretry clusters` rank. Rebuilt from the log like every audit read model.

-- One row per signature: its normalized text and a few lines as logged.
CREATE TABLE audit_signatures (
    signature   text        PRIMARY KEY,
    algorithm   text        NOT NULL,
    text        text        NOT NULL,
    examples    text[]      NOT NULL DEFAULT '{}',
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);

-- One row per failed job's verdict that has a signature, with its outcome once known.
CREATE TABLE audit_signature_jobs (
    verdict_event_id  uuid        PRIMARY KEY,
    signature         text        NOT NULL,
    source            text        NOT NULL,
    project           text        NOT NULL,
    pipeline_id       text        NOT NULL,
    job_id            text        NOT NULL,
    job_name          text        NOT NULL,
    category          text        NOT NULL,
    -- the rule that decided the verdict (none: no rule explained it)
    rule              text,
    retryable         boolean     NOT NULL,
    learned           boolean     NOT NULL DEFAULT false,
    recorded_at       timestamptz NOT NULL,
    outcome           text
);
CREATE INDEX audit_signature_jobs_by_time ON audit_signature_jobs (recorded_at);
CREATE INDEX audit_signature_jobs_by_signature ON audit_signature_jobs (signature, recorded_at);
