-- mimeo 0.1.0: the destination-side schema.
--
-- Installed by `mimeo-agent install` (which creates the schema first and
-- records the version in mimeo.schema_version) or by CREATE EXTENSION mimeo.
-- The SQL functions never move data: they validate, enqueue a request and
-- NOTIFY; mimeo-agent does the work and writes the outcome back here.

\echo Use "CREATE EXTENSION mimeo" or "mimeo-agent install" to load this file. \quit

-- Sources. Holds passwords: nobody but the owner may read it.
CREATE TABLE mimeo.dblink_mapping (
    data_source_id serial PRIMARY KEY,
    data_source text NOT NULL,
    username text NOT NULL,
    pwd text,
    dbh_attr text
);
REVOKE ALL ON mimeo.dblink_mapping FROM PUBLIC;
COMMENT ON TABLE mimeo.dblink_mapping IS
    'Source databases: data_source is a libpq conninfo (host=... port=... dbname=...); username/pwd log in.';

-- Replicated tables: one child table per replication type.
CREATE TABLE mimeo.refresh_config (
    dest_table text NOT NULL,
    type text NOT NULL,
    dblink int NOT NULL,
    source_table text NOT NULL,
    last_run timestamptz,
    filter text[],
    condition text,
    period interval,
    batch_limit int NOT NULL DEFAULT 10000 CHECK (batch_limit > 0),
    create_indexes boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE mimeo.refresh_config IS
    'Parent of the per-type config tables; last_run is when the last successful run started (its data is as of then).';

CREATE TABLE mimeo.refresh_config_snap (
    n_tup_ins bigint,
    n_tup_upd bigint,
    n_tup_del bigint,
    post_script text[],
    CONSTRAINT refresh_config_snap_pkey PRIMARY KEY (dest_table),
    CONSTRAINT refresh_config_snap_dblink_fkey FOREIGN KEY (dblink)
        REFERENCES mimeo.dblink_mapping (data_source_id),
    CONSTRAINT refresh_config_snap_type_check CHECK (type = 'snap')
) INHERITS (mimeo.refresh_config);

CREATE TABLE mimeo.refresh_config_table (
    post_script text[],
    sequences text[],
    CONSTRAINT refresh_config_table_pkey PRIMARY KEY (dest_table),
    CONSTRAINT refresh_config_table_dblink_fkey FOREIGN KEY (dblink)
        REFERENCES mimeo.dblink_mapping (data_source_id),
    CONSTRAINT refresh_config_table_type_check CHECK (type = 'table')
) INHERITS (mimeo.refresh_config);

-- A primary key only covers one child; this keeps dest_table unique across
-- all of them. The advisory lock closes the race between two inserts.
CREATE FUNCTION mimeo.refresh_config_unique() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('mimeo.refresh_config:' || NEW.dest_table, 0));
    IF EXISTS (SELECT 1 FROM mimeo.refresh_config
               WHERE dest_table = NEW.dest_table AND tableoid <> TG_RELID) THEN
        RAISE EXCEPTION 'mimeo: % is already configured with another replication type', NEW.dest_table
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER refresh_config_unique BEFORE INSERT OR UPDATE OF dest_table ON mimeo.refresh_config_snap
    FOR EACH ROW EXECUTE FUNCTION mimeo.refresh_config_unique();
CREATE TRIGGER refresh_config_unique BEFORE INSERT OR UPDATE OF dest_table ON mimeo.refresh_config_table
    FOR EACH ROW EXECUTE FUNCTION mimeo.refresh_config_unique();

-- The request queue. requested_xact lets wait() tell that a request was made
-- in the caller's own, still open, transaction (the agent cannot see it yet).
CREATE TABLE mimeo.request (
    id bigserial PRIMARY KEY,
    action text NOT NULL,
    dest_table text,
    args jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'done', 'failed', 'skipped')),
    requested_by text NOT NULL DEFAULT current_user,
    requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    requested_xact xid8 DEFAULT pg_current_xact_id(),
    started_at timestamptz,
    finished_at timestamptz,
    agent_id bigint,
    attempts int NOT NULL DEFAULT 0,
    rows_moved bigint,
    job_id bigint,
    message text,
    error text
);
CREATE INDEX request_queued_idx ON mimeo.request (id) WHERE status = 'queued';
CREATE INDEX request_running_idx ON mimeo.request (agent_id) WHERE status = 'running';
CREATE INDEX request_dest_table_idx ON mimeo.request (dest_table, id);

-- Running agents. Each holds the advisory lock (mimeo.agent_lock_key(), id)
-- on a session of its own while it lives: a lock that is gone means a dead
-- agent even before its heartbeat goes stale.
CREATE TABLE mimeo.agent (
    id bigserial PRIMARY KEY,
    host text NOT NULL,
    pid int NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION mimeo.agent_lock_key() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1835625829 $$; -- 'mime'

-- The audit trail, in the spirit of pg_jobmon: one job per run, its steps.
CREATE TABLE mimeo.job_log (
    job_id bigserial PRIMARY KEY,
    job_name text NOT NULL,
    dest_table text,
    request_id bigint,
    agent_id bigint,
    start_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    end_time timestamptz,
    status text NOT NULL DEFAULT 'RUNNING'
        CHECK (status IN ('RUNNING', 'OK', 'WARNING', 'CRITICAL')),
    rows_moved bigint
);
CREATE INDEX job_log_dest_table_idx ON mimeo.job_log (dest_table, job_id);

CREATE TABLE mimeo.job_detail (
    job_id bigint NOT NULL REFERENCES mimeo.job_log ON DELETE CASCADE,
    step_id int NOT NULL,
    action text NOT NULL,
    start_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    end_time timestamptz,
    elapsed_time numeric,
    status text,
    message text,
    PRIMARY KEY (job_id, step_id)
);

------------------------------------------------------------------------------
-- Validation helpers: cheap checks that raise at once and write nothing.
------------------------------------------------------------------------------

-- Returns the canonical "schema"."table" spelling (as format('%I.%I') gives)
-- of a schema-qualified name, or raises when the name is not one.
CREATE FUNCTION mimeo.qualified_name(p_name text, p_param text DEFAULT 'table name') RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_parts text[];
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'mimeo: % is required', p_param USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        v_parts := parse_ident(p_name);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'mimeo: % % is not a valid name: %', p_param, quote_literal(p_name), SQLERRM
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF array_length(v_parts, 1) <> 2 THEN
        RAISE EXCEPTION 'mimeo: % % must be schema-qualified (schema.table)', p_param, quote_literal(p_name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Write it as schema.table, e.g. public.orders; quote odd names: public."Order Lines".';
    END IF;
    IF octet_length(v_parts[1]) > 63 OR octet_length(v_parts[2]) > 63 THEN
        RAISE EXCEPTION 'mimeo: % % has a part longer than 63 bytes', p_param, quote_literal(p_name)
            USING ERRCODE = 'name_too_long';
    END IF;
    RETURN format('%I.%I', v_parts[1], v_parts[2]);
END
$$;

-- Raises unless a dblink_mapping row with this id exists. SECURITY DEFINER
-- because callers need not be able to read the passwords in that table.
CREATE FUNCTION mimeo.check_dblink(p_dblink_id int) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_dblink_id IS NULL THEN
        RAISE EXCEPTION 'mimeo: p_dblink_id is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM mimeo.dblink_mapping WHERE data_source_id = p_dblink_id) THEN
        RAISE EXCEPTION 'mimeo: no source with data_source_id % in mimeo.dblink_mapping', p_dblink_id
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'Register the source first: INSERT INTO mimeo.dblink_mapping (data_source, username, pwd) VALUES (''host=... dbname=...'', ''role'', ''password'').';
    END IF;
END
$$;

-- Raises when the destination name is taken, by mimeo or by any relation.
CREATE FUNCTION mimeo.check_new_destination(p_dest_table text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM mimeo.refresh_config WHERE dest_table = p_dest_table) THEN
        RAISE EXCEPTION 'mimeo: % is already replicated', p_dest_table
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Drop it first with the matching *_destroyer function.';
    END IF;
    IF to_regclass(p_dest_table) IS NOT NULL THEN
        RAISE EXCEPTION 'mimeo: destination table % already exists', p_dest_table
            USING ERRCODE = 'duplicate_table';
    END IF;
END
$$;

-- Raises unless p_dest_table is configured with replication type p_type.
CREATE FUNCTION mimeo.check_config(p_dest_table text, p_type text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_type text;
BEGIN
    SELECT type INTO v_type FROM mimeo.refresh_config WHERE dest_table = p_dest_table;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'mimeo: % is not a replicated table', p_dest_table
            USING ERRCODE = 'undefined_table',
                  HINT = 'SELECT dest_table, type FROM mimeo.refresh_config lists what is.';
    END IF;
    IF v_type <> p_type THEN
        RAISE EXCEPTION 'mimeo: % is replicated as type %, not %', p_dest_table, v_type, p_type
            USING ERRCODE = 'wrong_object_type';
    END IF;
END
$$;

------------------------------------------------------------------------------
-- The request path.
------------------------------------------------------------------------------

-- Records a request and wakes the agents. The notification is delivered when
-- the caller's transaction commits, together with the request row.
CREATE FUNCTION mimeo.enqueue(p_action text, p_dest_table text, p_args jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO mimeo.request (action, dest_table, args)
    VALUES (p_action, p_dest_table, jsonb_strip_nulls(coalesce(p_args, '{}')))
    RETURNING id INTO v_id;
    PERFORM pg_notify('mimeo_request', v_id::text);
    RETURN v_id;
END
$$;

-- Blocks until the request has ended and returns it; raises its error when
-- it failed, and a timeout that says whether any agent is alive.
CREATE FUNCTION mimeo.wait(p_request_id bigint, p_timeout interval DEFAULT '1 hour') RETURNS mimeo.request
LANGUAGE plpgsql AS $$
DECLARE
    r mimeo.request;
    v_deadline timestamptz := clock_timestamp() + coalesce(p_timeout, '1 hour');
    v_sleep float8 := 0.01;
    v_seen timestamptz;
BEGIN
    SELECT * INTO r FROM mimeo.request WHERE id = p_request_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'mimeo: no request with id %', p_request_id USING ERRCODE = 'no_data_found';
    END IF;
    IF r.status = 'queued' AND r.requested_xact = pg_current_xact_id_if_assigned() THEN
        RAISE EXCEPTION 'mimeo: request % was made in this transaction, so no agent can see it yet', p_request_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'COMMIT first and call mimeo.wait() in a new statement, or use the CALL form (e.g. CALL mimeo.refresh_snap_wait(...)).';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'mimeo: wait() needs READ COMMITTED isolation to see the agent''s progress'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    LOOP
        SELECT * INTO r FROM mimeo.request WHERE id = p_request_id;
        EXIT WHEN r.status IN ('done', 'failed', 'skipped');
        IF clock_timestamp() >= v_deadline THEN
            SELECT max(last_seen) INTO v_seen FROM mimeo.agent;
            IF v_seen IS NULL OR v_seen < clock_timestamp() - interval '1 minute' THEN
                RAISE EXCEPTION 'mimeo: timed out after % waiting for request % (still %): no mimeo-agent is running (%)',
                    coalesce(p_timeout, '1 hour'), p_request_id, r.status,
                    CASE WHEN v_seen IS NULL THEN 'no agent has ever registered'
                         ELSE 'last heartbeat at ' || v_seen::text END
                    USING ERRCODE = 'query_canceled',
                          HINT = 'Start one: MIMEO_DATABASE_URL=... mimeo-agent run';
            END IF;
            RAISE EXCEPTION 'mimeo: timed out after % waiting for request % (still %); an agent is alive (last heartbeat at %)',
                coalesce(p_timeout, '1 hour'), p_request_id, r.status, v_seen
                USING ERRCODE = 'query_canceled',
                      HINT = 'The agent may be busy: SELECT * FROM mimeo.request WHERE status IN (''queued'', ''running'').';
        END IF;
        PERFORM pg_sleep(least(v_sleep, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0.001)));
        v_sleep := least(v_sleep * 2, 0.25);
    END LOOP;
    IF r.status = 'failed' THEN
        RAISE EXCEPTION 'mimeo: request % (% %) failed: %', r.id, r.action, r.dest_table, r.error
            USING ERRCODE = 'external_routine_exception';
    ELSIF r.status = 'skipped' THEN
        RAISE WARNING 'mimeo: request % (% %) skipped: %', r.id, r.action, r.dest_table, r.message;
    END IF;
    RETURN r;
END
$$;

-- Commits the caller's transaction, so the request becomes visible, then
-- waits. Called by the *_wait procedures; CALL it outside a transaction block.
CREATE PROCEDURE mimeo.commit_and_wait(p_request_id bigint, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
DECLARE
    r mimeo.request;
BEGIN
    COMMIT;
    r := mimeo.wait(p_request_id, p_timeout);
    RAISE NOTICE 'mimeo: request % % %: %', r.id, r.action, r.status, coalesce(r.message, '');
END
$$;

------------------------------------------------------------------------------
-- snap: a view over two tables, the idle one reloaded and swapped in.
------------------------------------------------------------------------------

CREATE FUNCTION mimeo.snapshot_maker(
    p_src_table text,
    p_dblink_id int,
    p_dest_table text DEFAULT NULL,
    p_pulldata boolean DEFAULT true,
    p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_post_script text[] DEFAULT NULL,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_new_destination(v_dest);
    RETURN mimeo.enqueue('snapshot_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', p_pulldata, 'index', p_index,
        'filter', p_filter, 'condition', p_condition, 'post_script', p_post_script, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_snap(
    p_destination text,
    p_debug boolean DEFAULT false,
    p_pulldata boolean DEFAULT true
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'snap');
    RETURN mimeo.enqueue('refresh_snap', v_dest, jsonb_build_object('debug', p_debug, 'pulldata', p_pulldata));
END
$$;

CREATE FUNCTION mimeo.snapshot_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'snap');
    RETURN mimeo.enqueue('snapshot_destroyer', v_dest, jsonb_build_object(
        'archive', upper(coalesce(p_archive_option, '')) = 'ARCHIVE'));
END
$$;

------------------------------------------------------------------------------
-- table: truncate and reload a plain table (dev copies).
------------------------------------------------------------------------------

CREATE FUNCTION mimeo.table_maker(
    p_src_table text,
    p_dblink_id int,
    p_dest_table text DEFAULT NULL,
    p_pulldata boolean DEFAULT true,
    p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_sequences text[] DEFAULT NULL,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_new_destination(v_dest);
    RETURN mimeo.enqueue('table_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', p_pulldata, 'index', p_index,
        'filter', p_filter, 'condition', p_condition, 'sequences', p_sequences, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_table(
    p_destination text,
    p_truncate_cascade boolean DEFAULT false,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'table');
    RETURN mimeo.enqueue('refresh_table', v_dest, jsonb_build_object(
        'truncate_cascade', p_truncate_cascade, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.table_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'table');
    RETURN mimeo.enqueue('table_destroyer', v_dest, jsonb_build_object(
        'archive', upper(coalesce(p_archive_option, '')) = 'ARCHIVE'));
END
$$;

------------------------------------------------------------------------------
-- Synchronous forms: CALL one of these in psql (outside BEGIN ... COMMIT)
-- and it returns when the agent is done, like the old synchronous mimeo.
------------------------------------------------------------------------------

CREATE PROCEDURE mimeo.snapshot_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_index boolean DEFAULT true, p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL,
    p_post_script text[] DEFAULT NULL, p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.snapshot_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_index, p_filter, p_condition, p_post_script, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_snap_wait(
    p_destination text, p_debug boolean DEFAULT false, p_pulldata boolean DEFAULT true,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_snap(p_destination, p_debug, p_pulldata), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.snapshot_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.snapshot_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.table_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_index boolean DEFAULT true, p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL,
    p_sequences text[] DEFAULT NULL, p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.table_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_index, p_filter, p_condition, p_sequences, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_table_wait(
    p_destination text, p_truncate_cascade boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_table(p_destination, p_truncate_cascade, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.table_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.table_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

------------------------------------------------------------------------------
-- Scheduling and status.
------------------------------------------------------------------------------

-- Enqueues a refresh for up to p_batch tables of p_type that are due
-- (last_run + period <= now()) and have no request pending; returns their ids.
CREATE FUNCTION mimeo.run_refresh(p_type text, p_batch int DEFAULT 4, p_debug boolean DEFAULT false)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text;
BEGIN
    IF p_type NOT IN ('snap', 'table') THEN
        RAISE EXCEPTION 'mimeo: unknown replication type %', quote_literal(p_type)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Known types: snap, table.';
    END IF;
    FOR v_dest IN
        SELECT c.dest_table FROM mimeo.refresh_config c
        WHERE c.type = p_type AND c.period IS NOT NULL
          AND (c.last_run IS NULL OR c.last_run + c.period <= now())
          AND NOT EXISTS (SELECT 1 FROM mimeo.request r
                          WHERE r.dest_table = c.dest_table AND r.status IN ('queued', 'running'))
        ORDER BY c.last_run NULLS FIRST, c.dest_table
        LIMIT greatest(coalesce(p_batch, 4), 0)
    LOOP
        RETURN NEXT mimeo.enqueue('refresh_' || p_type, v_dest, jsonb_build_object('debug', p_debug));
    END LOOP;
END
$$;

-- What a DBA checks first: one row per replicated table.
CREATE VIEW mimeo.refresh_status AS
SELECT c.dest_table,
       c.type,
       c.dblink,
       c.source_table,
       c.last_run,
       ok.end_time AS last_success,
       bad.error AS last_error,
       bad.finished_at AS last_error_at,
       now() - c.last_run AS lag,
       c.period,
       pending.status AS pending
FROM mimeo.refresh_config c
LEFT JOIN LATERAL (
    SELECT j.end_time FROM mimeo.job_log j
    WHERE j.dest_table = c.dest_table AND j.status = 'OK'
    ORDER BY j.job_id DESC LIMIT 1) ok ON true
LEFT JOIN LATERAL (
    SELECT r.error, r.finished_at FROM mimeo.request r
    WHERE r.dest_table = c.dest_table AND r.status = 'failed'
      AND r.finished_at > coalesce(ok.end_time, '-infinity')
    ORDER BY r.id DESC LIMIT 1) bad ON true
LEFT JOIN LATERAL (
    SELECT r.status FROM mimeo.request r
    WHERE r.dest_table = c.dest_table AND r.status IN ('queued', 'running')
    ORDER BY r.id DESC LIMIT 1) pending ON true;

-- Kept by pg_dump when installed as an extension (the agent skips these lines).
SELECT pg_catalog.pg_extension_config_dump('mimeo.dblink_mapping', '');
SELECT pg_catalog.pg_extension_config_dump('mimeo.refresh_config_snap', '');
SELECT pg_catalog.pg_extension_config_dump('mimeo.refresh_config_table', '');
SELECT pg_catalog.pg_extension_config_dump('mimeo.dblink_mapping_data_source_id_seq', '');
