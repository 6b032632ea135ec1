-- mimeo 0.3.0 -> 0.4.0: one schema, whichever release a destination came from.
--
-- Releases before 0.4.0 edited their install scripts after shipping them,
-- so a destination upgraded to 0.3.0 could differ from a fresh 0.3.0. This
-- script brings every one of them to exactly the same schema: it repairs
-- the tables that differ, then drops every routine and creates it again
-- from the definitions below (the grants DBAs gave on them are kept). From
-- 0.4.0 on, a released script never changes; each change is a new one.
--
-- It also adds: the schema version check that keeps agents of another
-- release from running requests, agent rows that outlive their agent (so a
-- timed-out wait can say when an agent was last seen), recorded source
-- columns for the incremental and trigger-queue types, post_script for
-- them, the layout of the dml/logdel source objects, and procedures that
-- wait without holding a snapshot.

\echo Use "ALTER EXTENSION mimeo UPDATE" or "mimeo-agent install" to load this file. \quit

-- Runs of agents of this and later releases hold this lock shared: an
-- upgrade waits for the requests running now, and none starts meanwhile.
SELECT pg_catalog.pg_advisory_xact_lock(1835625831);

-- The grants on routines, to give back once they are re-created.
SELECT pg_catalog.set_config('mimeo.upgrade_routine_grants', coalesce((
    SELECT jsonb_agg(jsonb_build_object('routine', p.proname, 'grantee', a.grantee::regrole::text,
                                        'grantable', a.is_grantable))
    FROM pg_catalog.pg_proc p
    CROSS JOIN LATERAL aclexplode(p.proacl) a
    WHERE p.pronamespace = 'mimeo'::regnamespace AND a.privilege_type = 'EXECUTE'
      AND a.grantee <> 0 AND a.grantee <> p.proowner), '[]')::text, true);

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.oid::regprocedure AS routine, p.prokind
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'mimeo'::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgfoid = p.oid)
    LOOP
        EXECUTE format('DROP %s %s', CASE r.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, r.routine);
    END LOOP;
END
$$;

------------------------------------------------------------------------------
-- Tables.
------------------------------------------------------------------------------

-- Destinations first installed before 0.1.0 gained them lack the snap
-- statistics columns; post_script is moved after them, where a fresh
-- install has it (a dropped column leaves no trace in the schema).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                   WHERE attrelid = 'mimeo.refresh_config_snap'::regclass AND attname = 'source_filenode'
                     AND NOT attisdropped) THEN
        ALTER TABLE mimeo.refresh_config_snap
            ADD COLUMN source_filenode bigint,
            ADD COLUMN copied_with text,
            ADD COLUMN mimeo_post_script text[];
        UPDATE mimeo.refresh_config_snap SET mimeo_post_script = post_script;
        ALTER TABLE mimeo.refresh_config_snap DROP COLUMN post_script;
        ALTER TABLE mimeo.refresh_config_snap RENAME COLUMN mimeo_post_script TO post_script;
    END IF;
END
$$;

ALTER TABLE mimeo.request ALTER COLUMN requested_by SET DEFAULT session_user;

-- An agent's row stays when it stops (or dies), so waiters and monitors can
-- tell when one was last alive; schema_version is the schema it runs for.
ALTER TABLE mimeo.agent
    ADD COLUMN schema_version text,
    ADD COLUMN status text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'stopping', 'stopped', 'dead')),
    ADD COLUMN status_detail text,
    ADD COLUMN stopped_at timestamptz;
COMMENT ON COLUMN mimeo.agent.status IS
    'running; stopping (no longer claiming, e.g. after a schema upgrade: see status_detail); stopped (cleanly); dead (judged so by another agent).';

-- columns: the source columns the destination was built with, so that a
-- column dropped, renamed or added on the source is noticed at every run
-- (NULL for tables made before 0.4.0: their destination columns count).
ALTER TABLE mimeo.refresh_config_inserter ADD COLUMN columns text[], ADD COLUMN post_script text[];
ALTER TABLE mimeo.refresh_config_updater ADD COLUMN columns text[], ADD COLUMN post_script text[];
-- source_layout: 1 for source objects made before 0.4.0 (a row trigger for
-- key changes, no TRUNCATE trigger), 2 since; the agent upgrades layout 1
-- at the next run. trigger_tables: the source tables carrying the triggers
-- (the table and, when partitioned, every partition).
ALTER TABLE mimeo.refresh_config_dml
    ADD COLUMN columns text[], ADD COLUMN post_script text[],
    ADD COLUMN source_layout int NOT NULL DEFAULT 1, ADD COLUMN trigger_tables text[];
ALTER TABLE mimeo.refresh_config_logdel
    ADD COLUMN columns text[], ADD COLUMN post_script text[],
    ADD COLUMN source_layout int NOT NULL DEFAULT 1, ADD COLUMN trigger_tables text[];

------------------------------------------------------------------------------
-- Versions and locks.
------------------------------------------------------------------------------

-- The schema version installed; every later release replaces this function.
CREATE FUNCTION mimeo.installed_version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '0.4.0'::text $$;

CREATE FUNCTION mimeo.agent_lock_key() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1835625829 $$; -- 'mime'

-- Held shared by every run, taken exclusively by every upgrade.
CREATE FUNCTION mimeo.schema_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1835625831::bigint $$;

-- Only an agent of this schema's release may run a request: an agent left
-- running through an upgrade is refused here, whatever its version checks.
CREATE FUNCTION mimeo.request_running_check() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_expects text;
    v_schema text := mimeo.installed_version();
BEGIN
    SELECT coalesce(a.schema_version, a.version) INTO v_expects FROM mimeo.agent a WHERE a.id = NEW.agent_id;
    IF v_expects IS DISTINCT FROM v_schema THEN
        RAISE EXCEPTION 'mimeo: agent % runs for mimeo schema %, but this database has schema %: it may not run requests',
            coalesce(NEW.agent_id::text, '(none)'), coalesce(v_expects, 'unknown'), v_schema
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Restart that agent with mimeo-agent ' || v_schema || '.';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER request_running_check BEFORE INSERT OR UPDATE OF status ON mimeo.request
    FOR EACH ROW WHEN (NEW.status = 'running') EXECUTE FUNCTION mimeo.request_running_check();

-- A primary key only covers one child; this keeps dest_table unique across
-- all of them. The advisory lock closes the race between two inserts.
CREATE OR REPLACE FUNCTION mimeo.refresh_config_unique() RETURNS trigger
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

-- Raises unless a maker may configure p_dest_table: not replicated yet, in
-- a schema that exists. For incremental types the table itself may exist.
CREATE FUNCTION mimeo.check_not_configured(p_dest_table text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM mimeo.refresh_config WHERE dest_table = p_dest_table) THEN
        RAISE EXCEPTION 'mimeo: % is already replicated', p_dest_table
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Drop it first with the matching *_destroyer function.';
    END IF;
    IF to_regnamespace(quote_ident((parse_ident(p_dest_table))[1])) IS NULL THEN
        RAISE EXCEPTION 'mimeo: destination schema of % does not exist', p_dest_table
            USING ERRCODE = 'invalid_schema_name',
                  HINT = 'Create it first (CREATE SCHEMA ...), owned by or writable for the agent''s role.';
    END IF;
END
$$;

-- Raises when the destination name is taken, by mimeo or by any relation.
CREATE FUNCTION mimeo.check_new_destination(p_dest_table text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM mimeo.check_not_configured(p_dest_table);
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

-- Reads a destroyer's p_archive_option: true for 'ARCHIVE', false for NULL;
-- anything else is refused rather than taken to mean "drop".
CREATE FUNCTION mimeo.archive_option(p_archive_option text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_archive_option IS NULL THEN
        RETURN false;
    END IF;
    IF upper(btrim(p_archive_option)) = 'ARCHIVE' THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION 'mimeo: p_archive_option must be ''ARCHIVE'' (keep the data) or NULL (drop it), got %', quote_literal(p_archive_option)
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- Raises unless p_boundary is NULL, 'auto', an interval or an integer; the
-- agent checks it against the control column's type.
CREATE FUNCTION mimeo.check_boundary(p_boundary text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_boundary IS NULL OR lower(btrim(p_boundary)) = 'auto' OR btrim(p_boundary) ~ '^[0-9]+$' THEN
        RETURN;
    END IF;
    BEGIN
        IF p_boundary::interval < interval '0' THEN
            RAISE EXCEPTION 'negative';
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'mimeo: p_boundary % is not ''auto'', a non-negative interval or a non-negative integer', quote_literal(p_boundary)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use an interval such as ''10 minutes'' for a timestamp control column, an integer for a serial one, or ''auto''.';
    END;
END
$$;

-- Raises unless p_pk_field and p_pk_type are both NULL or match up.
CREATE FUNCTION mimeo.check_pk(p_pk_field text[], p_pk_type text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF (p_pk_field IS NULL) <> (p_pk_type IS NULL) THEN
        RAISE EXCEPTION 'mimeo: p_pk_field and p_pk_type must be given together'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'e.g. p_pk_field => ARRAY[''order_id''], p_pk_type => ARRAY[''bigint''].';
    END IF;
    IF p_pk_field IS NOT NULL AND (cardinality(p_pk_field) = 0 OR cardinality(p_pk_field) <> cardinality(p_pk_type)) THEN
        RAISE EXCEPTION 'mimeo: p_pk_field and p_pk_type must have the same, non-zero number of elements'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Raises on refresh arguments that cannot work. p_dest_table and p_type
-- name an inserter or updater table when a repull range is given: its
-- bounds are read as the control column's type, and must leave room
-- between them (the range is exclusive at both ends).
CREATE FUNCTION mimeo.check_incremental_refresh(p_dest_table text, p_type text, p_limit int, p_repull boolean,
    p_repull_start text, p_repull_end text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_control text;
    v_kind text;
    v_type text;
    v_start text;
    v_end text;
    v_ordered boolean;
BEGIN
    IF p_limit IS NOT NULL AND p_limit < 1 THEN
        RAISE EXCEPTION 'mimeo: p_limit must be at least 1, got %', p_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT coalesce(p_repull, false) AND (p_repull_start IS NOT NULL OR p_repull_end IS NOT NULL) THEN
        RAISE EXCEPTION 'mimeo: p_repull_start and p_repull_end need p_repull => true'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_repull_start IS NULL AND p_repull_end IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT control, control_type FROM mimeo.%I WHERE dest_table = $1', 'refresh_config_' || p_type)
        INTO v_control, v_kind USING p_dest_table;
    v_type := CASE v_kind WHEN 'serial' THEN 'bigint' WHEN 'timestamp' THEN 'timestamp' ELSE 'timestamptz' END;
    BEGIN
        EXECUTE format('SELECT $1::%1$s::text, $2::%1$s::text, $1::%1$s < $2::%1$s', v_type)
            INTO v_start, v_end, v_ordered USING p_repull_start, p_repull_end;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'mimeo: p_repull_start % / p_repull_end % must be values of the control column % (%): %',
            coalesce(quote_literal(p_repull_start), 'NULL'), coalesce(quote_literal(p_repull_end), 'NULL'), v_control, v_type, SQLERRM
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF NOT v_ordered THEN
        RAISE EXCEPTION 'mimeo: p_repull_start (%) must be below p_repull_end (%): the range excludes both ends, so it holds nothing',
            v_start, v_end
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- Raises unless every p_sequences element names a sequence of this
-- destination (the table type moves them past the loaded values).
CREATE FUNCTION mimeo.check_sequences(p_sequences text[]) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_seq text;
BEGIN
    FOREACH v_seq IN ARRAY coalesce(p_sequences, '{}') LOOP
        v_seq := mimeo.qualified_name(v_seq, 'p_sequences element');
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = to_regclass(v_seq) AND relkind = 'S') THEN
            RAISE EXCEPTION 'mimeo: p_sequences names %, which is not a sequence of this destination database', v_seq
                USING ERRCODE = 'undefined_object',
                      HINT = 'Create the sequence on the destination first, or leave it out.';
        END IF;
    END LOOP;
END
$$;

-- Scripts written for mimeo 1.5 pass p_jobmon and p_insert_on_fetch: they
-- run unchanged, and are told what became of the options.
CREATE FUNCTION mimeo.ignored_options(p_jobmon boolean, p_insert_on_fetch boolean DEFAULT NULL) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_jobmon IS NOT NULL THEN
        RAISE NOTICE 'mimeo: p_jobmon is ignored: every run is logged in mimeo.job_log and mimeo.job_detail';
    END IF;
    IF p_insert_on_fetch IS NOT NULL THEN
        RAISE NOTICE 'mimeo: p_insert_on_fetch is ignored: each batch streams from the source straight into the destination';
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

-- Raises the timeout of a wait for r, saying what is true now: whether an
-- agent is alive (and when one last was), how much work is ahead of the
-- request, and that it is still queued and will run.
CREATE FUNCTION mimeo.raise_wait_timeout(r mimeo.request, p_timeout interval) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_alive int;
    v_seen timestamptz;
    v_last mimeo.agent;
    v_running int;
    v_ahead int;
    v_state text;
BEGIN
    -- Alive: a recent heartbeat, and the liveness lock its session holds
    -- (gone at once when an agent is killed).
    SELECT count(*), max(last_seen) INTO v_alive, v_seen FROM mimeo.agent a
    WHERE a.status IN ('running', 'stopping') AND a.last_seen > clock_timestamp() - interval '1 minute'
      AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                    AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
                    AND l.classid = mimeo.agent_lock_key()::oid AND l.objid = a.id::oid);
    v_state := CASE
        WHEN r.status = 'queued' THEN 'it stays queued and runs when an agent takes it'
        WHEN v_alive > 0 THEN format('it is running on agent %s since %s, and will end on its own', r.agent_id, r.started_at)
        ELSE format('it was running on agent %s, which is gone: the next agent to start hands it back to the queue', r.agent_id) END;
    IF v_alive = 0 THEN
        SELECT * INTO v_last FROM mimeo.agent ORDER BY last_seen DESC LIMIT 1;
        RAISE EXCEPTION 'mimeo: timed out after % waiting for request % (%): no mimeo-agent is running (%); %',
            p_timeout, r.id, r.status,
            CASE WHEN v_last.id IS NULL THEN 'none has ever registered with this database'
                 ELSE format('the last one, agent %s on %s (pid %s), was last seen at %s, %s ago, and %s',
                             v_last.id, v_last.host, v_last.pid, date_trunc('second', v_last.last_seen),
                             date_trunc('second', clock_timestamp() - v_last.last_seen),
                             CASE v_last.status WHEN 'stopped' THEN 'stopped cleanly'
                                                ELSE 'died (its session is gone, or it stopped sending heartbeats)' END) END,
            v_state
            USING HINT = 'Start one: MIMEO_DATABASE_URL=... mimeo-agent run. Then wait again: SELECT * FROM mimeo.wait(' || r.id || ').';
    END IF;
    SELECT count(*) FILTER (WHERE status = 'running'), count(*) FILTER (WHERE status = 'queued' AND id < r.id)
    INTO v_running, v_ahead FROM mimeo.request WHERE status IN ('queued', 'running') AND id <> r.id;
    RAISE EXCEPTION 'mimeo: timed out after % waiting for request % (%): % alive (last heartbeat %s ago), busy with % running and % queued ahead of it; %',
        p_timeout, r.id, r.status,
        CASE WHEN v_alive = 1 THEN '1 agent is' ELSE v_alive || ' agents are' END,
        extract(epoch FROM date_trunc('second', clock_timestamp() - v_seen))::int, v_running, v_ahead, v_state
        USING HINT = 'Wait longer: SELECT * FROM mimeo.wait(' || r.id || ', ''2 hours''); see SELECT * FROM mimeo.request WHERE status IN (''queued'', ''running'').';
END
$$;

-- Raises the outcome of a finished request: its error when it failed, a
-- warning when it was skipped.
CREATE FUNCTION mimeo.raise_outcome(r mimeo.request) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF r.status = 'failed' THEN
        RAISE EXCEPTION 'mimeo: request % (% %) failed: %', r.id, r.action, r.dest_table, r.error
            USING ERRCODE = 'external_routine_exception';
    ELSIF r.status = 'skipped' THEN
        RAISE WARNING 'mimeo: request % (% %) skipped: %', r.id, r.action, r.dest_table, r.message;
    END IF;
END
$$;

-- One poll of a waiter: the finished request (its error raised when it
-- failed), NULL while it has not ended, the timeout raised once p_deadline
-- has passed. SECURITY DEFINER: a waiter needs no rights on the queue.
CREATE FUNCTION mimeo.wait_poll(p_request_id bigint, p_deadline timestamptz, p_timeout interval) RETURNS mimeo.request
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r mimeo.request;
BEGIN
    SELECT * INTO r FROM mimeo.request WHERE id = p_request_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'mimeo: no request with id %', p_request_id USING ERRCODE = 'no_data_found';
    END IF;
    IF r.status IN ('done', 'failed', 'skipped') THEN
        PERFORM mimeo.raise_outcome(r);
        RETURN r;
    END IF;
    IF clock_timestamp() >= p_deadline THEN
        PERFORM mimeo.raise_wait_timeout(r, p_timeout);
    END IF;
    RETURN NULL;
END
$$;

-- Blocks until the request has ended and returns it; raises its error when
-- it failed, and a timeout that says what is going on otherwise. As a
-- function it runs in one snapshot, which holds back vacuum for the whole
-- wait: for long waits use the CALL ..._wait procedures, which do not.
CREATE FUNCTION mimeo.wait(p_request_id bigint, p_timeout interval DEFAULT '1 hour') RETURNS mimeo.request
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r mimeo.request;
    v_timeout interval := coalesce(p_timeout, '1 hour');
    v_deadline timestamptz := clock_timestamp() + v_timeout;
    v_sleep float8 := 0.001;
BEGIN
    SELECT * INTO r FROM mimeo.request WHERE id = p_request_id;
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
        r := mimeo.wait_poll(p_request_id, v_deadline, v_timeout);
        EXIT WHEN r.id IS NOT NULL;
        -- From 1 ms up to 50 ms: a short run is seen ending within a few
        -- ms, a long one within 50 ms, at the cost of an index probe.
        PERFORM pg_sleep(least(v_sleep, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0.001)));
        v_sleep := least(v_sleep * 1.5, 0.05);
    END LOOP;
    RETURN r;
END
$$;

-- Commits the caller's transaction, so the request becomes visible, then
-- polls until it has ended, committing between polls: no snapshot is held
-- while it waits, so vacuum goes on. Called by the *_wait procedures; CALL
-- it outside a transaction block.
CREATE PROCEDURE mimeo.commit_and_wait(p_request_id bigint, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
DECLARE
    r mimeo.request;
    v_timeout interval := coalesce(p_timeout, '1 hour');
    v_deadline timestamptz;
    v_sleep float8 := 0.001;
BEGIN
    COMMIT;
    v_deadline := clock_timestamp() + v_timeout;
    LOOP
        r := mimeo.wait_poll(p_request_id, v_deadline, v_timeout);
        EXIT WHEN r.id IS NOT NULL;
        COMMIT;
        PERFORM pg_sleep(least(v_sleep, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0.001)));
        v_sleep := least(v_sleep * 1.5, 0.05);
    END LOOP;
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
    p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
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
    p_pulldata boolean DEFAULT true,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_config(v_dest, 'snap');
    RETURN mimeo.enqueue('refresh_snap', v_dest, jsonb_build_object('debug', p_debug, 'pulldata', p_pulldata));
END
$$;

CREATE FUNCTION mimeo.snapshot_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'snap');
    RETURN mimeo.enqueue('snapshot_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option)));
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
    p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_new_destination(v_dest);
    PERFORM mimeo.check_sequences(p_sequences);
    RETURN mimeo.enqueue('table_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', p_pulldata, 'index', p_index,
        'filter', p_filter, 'condition', p_condition, 'sequences', p_sequences, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_table(
    p_destination text,
    p_truncate_cascade boolean DEFAULT false,
    p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_config(v_dest, 'table');
    RETURN mimeo.enqueue('refresh_table', v_dest, jsonb_build_object(
        'truncate_cascade', p_truncate_cascade, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.table_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'table');
    RETURN mimeo.enqueue('table_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option)));
END
$$;

------------------------------------------------------------------------------
-- inserter and updater: incremental by a control column.
------------------------------------------------------------------------------

CREATE FUNCTION mimeo.inserter_maker(
    p_src_table text,
    p_control_field text,
    p_dblink_id int,
    p_boundary text DEFAULT NULL,
    p_dest_table text DEFAULT NULL,
    p_pulldata boolean DEFAULT true,
    p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_debug boolean DEFAULT false,
    p_post_script text[] DEFAULT NULL,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    IF p_control_field IS NULL OR p_control_field = '' THEN
        RAISE EXCEPTION 'mimeo: p_control_field is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM mimeo.check_boundary(p_boundary);
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_not_configured(v_dest);
    RETURN mimeo.enqueue('inserter_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'control', p_control_field, 'dblink', p_dblink_id, 'boundary', p_boundary,
        'pulldata', p_pulldata, 'index', p_index, 'filter', p_filter, 'condition', p_condition,
        'post_script', p_post_script, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.updater_maker(
    p_src_table text,
    p_control_field text,
    p_dblink_id int,
    p_boundary text DEFAULT NULL,
    p_dest_table text DEFAULT NULL,
    p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL,
    p_pk_type text[] DEFAULT NULL,
    p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_debug boolean DEFAULT false,
    p_post_script text[] DEFAULT NULL,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    IF p_control_field IS NULL OR p_control_field = '' THEN
        RAISE EXCEPTION 'mimeo: p_control_field is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM mimeo.check_boundary(p_boundary);
    PERFORM mimeo.check_pk(p_pk_field, p_pk_type);
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_not_configured(v_dest);
    RETURN mimeo.enqueue('updater_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'control', p_control_field, 'dblink', p_dblink_id, 'boundary', p_boundary,
        'pulldata', p_pulldata, 'pk_field', p_pk_field, 'pk_type', p_pk_type, 'index', p_index,
        'filter', p_filter, 'condition', p_condition, 'post_script', p_post_script, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_inserter(
    p_destination text,
    p_limit int DEFAULT NULL,
    p_repull boolean DEFAULT false,
    p_repull_start text DEFAULT NULL,
    p_repull_end text DEFAULT NULL,
    p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_config(v_dest, 'inserter');
    PERFORM mimeo.check_incremental_refresh(v_dest, 'inserter', p_limit, p_repull, p_repull_start, p_repull_end);
    RETURN mimeo.enqueue('refresh_inserter', v_dest, jsonb_build_object(
        'limit', p_limit, 'repull', p_repull, 'repull_start', p_repull_start, 'repull_end', p_repull_end, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_updater(
    p_destination text,
    p_limit int DEFAULT NULL,
    p_repull boolean DEFAULT false,
    p_repull_start text DEFAULT NULL,
    p_repull_end text DEFAULT NULL,
    p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_config(v_dest, 'updater');
    PERFORM mimeo.check_incremental_refresh(v_dest, 'updater', p_limit, p_repull, p_repull_start, p_repull_end);
    RETURN mimeo.enqueue('refresh_updater', v_dest, jsonb_build_object(
        'limit', p_limit, 'repull', p_repull, 'repull_start', p_repull_start, 'repull_end', p_repull_end, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.inserter_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'inserter');
    RETURN mimeo.enqueue('inserter_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option)));
END
$$;

CREATE FUNCTION mimeo.updater_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'updater');
    RETURN mimeo.enqueue('updater_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option)));
END
$$;

------------------------------------------------------------------------------
-- dml and logdel: replay of changes queued by triggers on the source.
------------------------------------------------------------------------------

CREATE FUNCTION mimeo.dml_maker(
    p_src_table text,
    p_dblink_id int,
    p_dest_table text DEFAULT NULL,
    p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL,
    p_pk_type text[] DEFAULT NULL,
    p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_debug boolean DEFAULT false,
    p_post_script text[] DEFAULT NULL,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_pk(p_pk_field, p_pk_type);
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_new_destination(v_dest);
    RETURN mimeo.enqueue('dml_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', p_pulldata, 'pk_field', p_pk_field,
        'pk_type', p_pk_type, 'index', p_index, 'filter', p_filter, 'condition', p_condition,
        'post_script', p_post_script, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.logdel_maker(
    p_src_table text,
    p_dblink_id int,
    p_dest_table text DEFAULT NULL,
    p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL,
    p_pk_type text[] DEFAULT NULL,
    p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_debug boolean DEFAULT false,
    p_post_script text[] DEFAULT NULL,
    p_jobmon boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_pk(p_pk_field, p_pk_type);
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_new_destination(v_dest);
    RETURN mimeo.enqueue('logdel_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', p_pulldata, 'pk_field', p_pk_field,
        'pk_type', p_pk_type, 'index', p_index, 'filter', p_filter, 'condition', p_condition,
        'post_script', p_post_script, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_dml(
    p_destination text,
    p_limit int DEFAULT NULL,
    p_repull boolean DEFAULT false,
    p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL,
    p_insert_on_fetch boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon, p_insert_on_fetch);
    PERFORM mimeo.check_config(v_dest, 'dml');
    PERFORM mimeo.check_incremental_refresh(v_dest, 'dml', p_limit, p_repull, NULL, NULL);
    RETURN mimeo.enqueue('refresh_dml', v_dest, jsonb_build_object(
        'limit', p_limit, 'repull', p_repull, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_logdel(
    p_destination text,
    p_limit int DEFAULT NULL,
    p_repull boolean DEFAULT false,
    p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL,
    p_insert_on_fetch boolean DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon, p_insert_on_fetch);
    PERFORM mimeo.check_config(v_dest, 'logdel');
    PERFORM mimeo.check_incremental_refresh(v_dest, 'logdel', p_limit, p_repull, NULL, NULL);
    RETURN mimeo.enqueue('refresh_logdel', v_dest, jsonb_build_object(
        'limit', p_limit, 'repull', p_repull, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.dml_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'dml');
    RETURN mimeo.enqueue('dml_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option)));
END
$$;

CREATE FUNCTION mimeo.logdel_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'logdel');
    RETURN mimeo.enqueue('logdel_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option)));
END
$$;

------------------------------------------------------------------------------
-- Synchronous forms: CALL one of these in psql (outside BEGIN ... COMMIT)
-- and it returns when the agent is done, like the old synchronous mimeo.
------------------------------------------------------------------------------

CREATE PROCEDURE mimeo.snapshot_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_index boolean DEFAULT true, p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL,
    p_post_script text[] DEFAULT NULL, p_debug boolean DEFAULT false, p_jobmon boolean DEFAULT NULL,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.snapshot_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_index, p_filter, p_condition, p_post_script, p_debug, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_snap_wait(
    p_destination text, p_debug boolean DEFAULT false, p_pulldata boolean DEFAULT true,
    p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_snap(p_destination, p_debug, p_pulldata, p_jobmon), p_timeout);
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
    p_sequences text[] DEFAULT NULL, p_debug boolean DEFAULT false, p_jobmon boolean DEFAULT NULL,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.table_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_index, p_filter, p_condition, p_sequences, p_debug, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_table_wait(
    p_destination text, p_truncate_cascade boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_table(p_destination, p_truncate_cascade, p_debug, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.table_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.table_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.inserter_maker_wait(
    p_src_table text, p_control_field text, p_dblink_id int, p_boundary text DEFAULT NULL,
    p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true, p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_post_script text[] DEFAULT NULL, p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.inserter_maker(p_src_table, p_control_field, p_dblink_id, p_boundary,
        p_dest_table, p_pulldata, p_index, p_filter, p_condition, p_debug, p_post_script, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.updater_maker_wait(
    p_src_table text, p_control_field text, p_dblink_id int, p_boundary text DEFAULT NULL,
    p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true, p_pk_field text[] DEFAULT NULL,
    p_pk_type text[] DEFAULT NULL, p_index boolean DEFAULT true, p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL, p_debug boolean DEFAULT false, p_post_script text[] DEFAULT NULL,
    p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.updater_maker(p_src_table, p_control_field, p_dblink_id, p_boundary,
        p_dest_table, p_pulldata, p_pk_field, p_pk_type, p_index, p_filter, p_condition, p_debug,
        p_post_script, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_inserter_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false,
    p_repull_start text DEFAULT NULL, p_repull_end text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_inserter(p_destination, p_limit, p_repull,
        p_repull_start, p_repull_end, p_debug, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_updater_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false,
    p_repull_start text DEFAULT NULL, p_repull_end text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_updater(p_destination, p_limit, p_repull,
        p_repull_start, p_repull_end, p_debug, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.inserter_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.inserter_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.updater_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.updater_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.dml_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL, p_pk_type text[] DEFAULT NULL, p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_post_script text[] DEFAULT NULL, p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.dml_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_pk_field, p_pk_type, p_index, p_filter, p_condition, p_debug, p_post_script, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_dml_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL, p_insert_on_fetch boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_dml(p_destination, p_limit, p_repull, p_debug,
        p_jobmon, p_insert_on_fetch), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.dml_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.dml_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.logdel_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL, p_pk_type text[] DEFAULT NULL, p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_post_script text[] DEFAULT NULL, p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logdel_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_pk_field, p_pk_type, p_index, p_filter, p_condition, p_debug, p_post_script, p_jobmon), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_logdel_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_jobmon boolean DEFAULT NULL, p_insert_on_fetch boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_logdel(p_destination, p_limit, p_repull, p_debug,
        p_jobmon, p_insert_on_fetch), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.logdel_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logdel_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

------------------------------------------------------------------------------
-- Scheduling and status.
------------------------------------------------------------------------------

-- Enqueues a refresh for up to p_batch tables of p_type that are due
-- (last_run + period <= now()) and have no request pending; returns their ids.
CREATE FUNCTION mimeo.run_refresh(p_type text, p_batch int DEFAULT 4, p_debug boolean DEFAULT false)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text;
BEGIN
    IF p_type IS NULL OR p_type NOT IN ('snap', 'table', 'inserter', 'updater', 'dml', 'logdel') THEN
        RAISE EXCEPTION 'mimeo: unknown replication type %', quote_literal(p_type)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Known types: snap, table, inserter, updater, dml, logdel.';
    END IF;
    -- Serializes concurrent callers (several agents schedule at once), so
    -- the pending-request check below cannot be raced.
    PERFORM pg_advisory_xact_lock(hashtextextended('mimeo.run_refresh:' || p_type, 0));
    FOR v_dest IN
        SELECT c.dest_table FROM mimeo.refresh_config c
        WHERE c.type = p_type AND c.period IS NOT NULL
          AND (c.last_run IS NULL OR c.last_run + c.period <= now())
          AND NOT EXISTS (SELECT 1 FROM mimeo.request r
                          WHERE r.dest_table = c.dest_table AND r.status IN ('queued', 'running'))
          -- A table whose last attempt failed waits a period before the next.
          AND NOT EXISTS (SELECT 1 FROM mimeo.request r
                          WHERE r.dest_table = c.dest_table AND r.status = 'failed'
                            AND r.finished_at > now() - c.period)
        ORDER BY c.last_run NULLS FIRST, c.dest_table
        LIMIT greatest(coalesce(p_batch, 4), 0)
    LOOP
        RETURN NEXT mimeo.enqueue('refresh_' || p_type, v_dest, jsonb_build_object('debug', p_debug));
    END LOOP;
END
$$;

------------------------------------------------------------------------------
-- Privileges.
------------------------------------------------------------------------------

-- Nothing here is for everyone: the owner grants USAGE on the schema and
-- EXECUTE on the functions an operator role may call. The request-making
-- functions run as the owner (SECURITY DEFINER), so such a role needs no
-- rights on the tables, and cannot queue anything they would refuse.
REVOKE ALL ON ALL ROUTINES IN SCHEMA mimeo FROM PUBLIC;

-- Give back the grants the routines had. A role that could wait may now
-- also poll, which the CALL forms do with mimeo.wait_poll().
DO $$
DECLARE
    g record;
    r regprocedure;
BEGIN
    FOR g IN
        SELECT DISTINCT x.routine, x.grantee, x.grantable
        FROM jsonb_to_recordset(current_setting('mimeo.upgrade_routine_grants')::jsonb)
             AS x(routine text, grantee text, grantable boolean)
        UNION
        SELECT DISTINCT 'wait_poll', x.grantee, false
        FROM jsonb_to_recordset(current_setting('mimeo.upgrade_routine_grants')::jsonb)
             AS x(routine text, grantee text, grantable boolean)
        WHERE x.routine IN ('wait', 'commit_and_wait')
    LOOP
        FOR r IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
                 WHERE p.pronamespace = 'mimeo'::regnamespace AND p.proname = g.routine LOOP
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %s%s', r, g.grantee,
                           CASE WHEN g.grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END LOOP;
END
$$;
