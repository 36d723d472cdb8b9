-- Attempt chains in the audit read models: which pipelines rerun which (a pipeline act created to
-- rerun a job of another, and so on), and the sizes the attempts of a job ran with, so "why" can
-- show a chain's every attempt, origin first.

-- One row per pipeline that belongs to another pipeline's chain (origins have no row).
CREATE TABLE audit_chains (
    source             text NOT NULL,
    project            text NOT NULL,
    pipeline_id        text NOT NULL,
    origin_pipeline_id text NOT NULL,
    -- the memory the pipeline was created with (its resource variables), MiB
    asked_memory_mb    integer,
    PRIMARY KEY (source, project, pipeline_id)
);
CREATE INDEX audit_chains_origin ON audit_chains (source, project, origin_pipeline_id);

-- The memory of the container that died (the verdict's observed size) and the memory act asked
-- for the rerun of this attempt (the request's resources), MiB.
ALTER TABLE audit_jobs ADD COLUMN observed_memory_mb integer;
ALTER TABLE audit_jobs ADD COLUMN requested_memory_mb integer;

-- How act's call to the CI provider for this attempt's retry ended: issued | failed (final),
-- so a request whose call failed is not shown as merely "requested".
ALTER TABLE audit_jobs ADD COLUMN call_status text;

-- The chain a retry request belongs to (NULL: its own pipeline is the origin).
ALTER TABLE audit_retries ADD COLUMN origin_pipeline_id text;
