-- Least privilege (issue 18): the role the services run as, with exactly what they need.
--
-- 0001's `REVOKE ... FROM PUBLIC` revoked nothing (nothing had been granted), and services that
-- connect as the owner could drop the append-only trigger. So: `ciretry migrate` runs as the
-- owner and calls these two functions for the role CIRETRY_DATABASE_RUNTIME_ROLE names; the
-- services connect as that role. It may read and append to `events` and nothing else there:
-- UPDATE, DELETE and TRUNCATE are refused by privileges (before the trigger is even asked), and
-- only the owner may ALTER the table, so the trigger cannot be disabled either.
--
-- Both functions run with the caller's rights (no SECURITY DEFINER): only the owner can grant.

-- Create the role when missing (NOLOGIN: a group role to grant to a login role) and, given a
-- password, let it log in with it. Returns 'created', 'exists' or 'cannot_create' (the owner
-- has no CREATEROLE: a DBA creates the role, and the next migrate grants to it).
CREATE FUNCTION ciretry_ensure_role(p_role text, p_password text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    outcome text := 'exists';
    info record;
BEGIN
    IF p_role = current_user THEN
        RAISE EXCEPTION 'the runtime role % is the owner running the migration: give the services a role of their own', p_role
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT rolsuper, rolbypassrls INTO info FROM pg_roles WHERE rolname = p_role;
    IF NOT FOUND THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', p_role);
            outcome := 'created';
        EXCEPTION WHEN insufficient_privilege THEN
            RETURN 'cannot_create';
        END;
    ELSIF info.rolsuper THEN
        RAISE EXCEPTION 'the runtime role % is a superuser: no privilege binds it', p_role
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(p_password, '') <> '' THEN
        EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', p_role, p_password);
    END IF;
    RETURN outcome;
END;
$$;

-- Grant the role what the services need in this schema (re-run by every migrate, so tables of
-- later migrations are covered): SELECT and INSERT on the log; reading and writing the outbox,
-- tracking, follower positions, pending requests and the read models; reading the list of
-- applied migrations (a service checks that none is pending). No CREATE on the schema.
CREATE FUNCTION ciretry_grant_runtime(p_role text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s text := current_schema();
    t text;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, p_role);
    EXECUTE format('REVOKE ALL ON TABLE %I.events FROM %I', s, p_role);
    EXECUTE format('GRANT SELECT, INSERT ON TABLE %I.events TO %I', s, p_role);
    EXECUTE format('REVOKE ALL ON TABLE %I.schema_migrations FROM %I', s, p_role);
    EXECUTE format('GRANT SELECT ON TABLE %I.schema_migrations TO %I', s, p_role);
    FOR t IN
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = s AND c.relkind IN ('r', 'p')
          AND c.relname NOT IN ('events', 'schema_migrations')
    LOOP
        EXECUTE format(
            'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLE %I.%I TO %I', s, t, p_role);
    END LOOP;
    EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO %I', s, p_role);
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM %I', s, p_role);
END;
$$;
-- Only the owner has any use for these two.
REVOKE EXECUTE ON FUNCTION ciretry_ensure_role(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION ciretry_grant_runtime(text) FROM PUBLIC;
