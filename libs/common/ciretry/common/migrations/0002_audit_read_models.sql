-- Read models of the audit API and dashboard (ciretry.audit), projected from the event log.
-- They are not the source of truth: `ciretry replay --projections` truncates and rebuilds them
-- from position 0. The projector commits every change together with its position below.

-- How far each projection has applied the log; the row is locked (FOR UPDATE) while a batch is
-- applied, so two projector replicas never apply the same event twice.
CREATE TABLE projection_position (
    name     text   PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0
);

-- One row per job attempt: what it is, its verdict and act's decision about it.
CREATE TABLE audit_jobs (
    source            text NOT NULL,
    project           text NOT NULL,
    job_id            text NOT NULL,
    pipeline_id       text,
    job_name          text,
    -- attempt order as a sortable string (numeric ids numerically, then provider attempt)
    order_key         text COLLATE "C",
    status            text,
    stage             text,
    runner            text,
    ref               text,
    attempt           integer,
    failure_reason    text,
    exit_code         integer,
    finished_at       timestamptz,
    first_position    bigint,
    last_position     bigint,
    verdict_event_id  uuid,
    category          text,
    retryable         boolean,
    budget            text,
    rules             text[],
    decision          text,     -- requested | skipped
    decision_action   text,
    decision_reason   text,     -- skip reason (RetrySkipped.reason)
    decision_detail   text,
    dry_run           boolean,
    retry_job_id      text,     -- RetryIssued.new_job_id
    PRIMARY KEY (source, project, job_id)
);
CREATE INDEX audit_jobs_pipeline ON audit_jobs (source, project, pipeline_id, job_name, order_key);
CREATE INDEX audit_jobs_job_id ON audit_jobs (job_id);

-- Job timeline: positions of every event about a job (its job stream and the pipeline stream's
-- events that name it); the events themselves are read from the log by position.
CREATE TABLE audit_job_events (
    source   text   NOT NULL,
    project  text   NOT NULL,
    job_id   text   NOT NULL,
    position bigint NOT NULL,
    PRIMARY KEY (source, project, job_id, position)
);

CREATE TABLE audit_verdicts (
    event_id    uuid PRIMARY KEY,
    source      text NOT NULL,
    project     text NOT NULL,
    pipeline_id text NOT NULL,
    job_id      text NOT NULL,
    job_name    text NOT NULL,
    category    text NOT NULL,
    retryable   boolean NOT NULL,
    rules       text[] NOT NULL,
    recorded_at timestamptz NOT NULL
);

CREATE TABLE audit_pipelines (
    source             text NOT NULL,
    project            text NOT NULL,
    pipeline_id        text NOT NULL,
    status             text,
    ref                text,
    sha                text,
    "user"             text,
    jobs_finished      integer NOT NULL DEFAULT 0,
    jobs_failed        integer NOT NULL DEFAULT 0,
    verdicts           integer NOT NULL DEFAULT 0,
    retries_requested  integer NOT NULL DEFAULT 0,
    retries_skipped    integer NOT NULL DEFAULT 0,
    retries_issued     integer NOT NULL DEFAULT 0,
    retries_failed     integer NOT NULL DEFAULT 0,
    budget_exhausted   integer NOT NULL DEFAULT 0,
    pipeline_retries   integer,
    pipeline_limit     integer,
    pipeline_jobs      integer,
    first_seen         timestamptz,
    last_seen          timestamptz,
    PRIMARY KEY (source, project, pipeline_id)
);
CREATE INDEX audit_pipelines_last_seen ON audit_pipelines (last_seen);

-- Time-bucketed counts (one hour per bucket): what the stats API and dashboard aggregate.
-- kind: jobs (key=status), failures (key=''), category, retryable (key=category), rule,
-- runner, job_name, decision (key=requested:<action> | skipped:<reason>), retry_outcome
-- (key=passed|failed), budget_exhausted (key=reason), disputed / confirmed (key=rule).
CREATE TABLE audit_stats (
    kind    text        NOT NULL,
    bucket  timestamptz NOT NULL,
    source  text        NOT NULL,
    project text        NOT NULL,
    key     text        NOT NULL,
    n       bigint      NOT NULL,
    PRIMARY KEY (kind, bucket, source, project, key)
);
CREATE INDEX audit_stats_project ON audit_stats (kind, project, bucket);

-- Retries act requested and whether the next attempt of the same job passed.
CREATE TABLE audit_retries (
    source        text NOT NULL,
    project       text NOT NULL,
    pipeline_id   text NOT NULL,
    job_id        text NOT NULL,
    job_name      text NOT NULL,
    order_key     text COLLATE "C" NOT NULL,
    idempotency_key text NOT NULL,
    action        text NOT NULL,
    category      text NOT NULL,
    dry_run       boolean NOT NULL,
    requested_at  timestamptz NOT NULL,
    outcome       text,     -- passed | failed (status of the next attempt)
    outcome_job_id text,
    PRIMARY KEY (idempotency_key)
);
CREATE INDEX audit_retries_job ON audit_retries (source, project, pipeline_id, job_name)
    WHERE outcome IS NULL;

-- Resource allocation per project + job name (+ ref): last OOM and the size act bumped it to.
CREATE TABLE audit_allocation (
    source             text NOT NULL,
    project            text NOT NULL,
    job_name           text NOT NULL,
    ref                text NOT NULL,
    memory_request_mb  integer,
    memory_limit_mb    integer,
    cpu_request_millis integer,
    cpu_limit_millis   integer,
    last_oom_at        timestamptz,
    last_oom_job_id    text,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (project, job_name, ref, source)
);

-- Feedback on verdicts, with the verdict's rules copied so disputes can be counted per rule.
CREATE TABLE audit_feedback (
    event_id         uuid PRIMARY KEY,
    verdict_event_id uuid NOT NULL,
    kind             text NOT NULL,   -- disputed | confirmed
    who              text NOT NULL,
    why              text,
    correct_category text,
    source           text,
    project          text,
    job_id           text,
    category         text,
    rules            text[] NOT NULL DEFAULT '{}',
    recorded_at      timestamptz NOT NULL
);
CREATE INDEX audit_feedback_recorded ON audit_feedback (recorded_at);

-- The same counts rolled up per UTC day: day and week stats over months read a few rows per
-- day instead of 24 (what keeps them well under 200 ms over millions of events).
CREATE TABLE audit_stats_daily (
    kind    text        NOT NULL,
    bucket  timestamptz NOT NULL,
    source  text        NOT NULL,
    project text        NOT NULL,
    key     text        NOT NULL,
    n       bigint      NOT NULL,
    PRIMARY KEY (kind, bucket, source, project, key)
);
CREATE INDEX audit_stats_daily_project ON audit_stats_daily (kind, project, bucket);
