-- mimeo 0.5.0 -> 0.6.0: is the copy right?
--
-- Validation: validate_rowcount and validate (key-range checksums on both
-- sides, with repair), check_source_columns, check_missing_source_tables and
-- snapshot_monitor; their results land in mimeo.validation. refresh_snap
-- gains p_force; CALL ..._wait(p_debug => true) shows the run's steps as
-- NOTICEs while it runs; refresh_status says whether a table is healthy,
-- and why not.

\echo Use "ALTER EXTENSION mimeo UPDATE" or "mimeo-agent install" to load this file. \quit

-- Runs of agents hold this lock shared: an upgrade waits for them.
SELECT pg_catalog.pg_advisory_xact_lock(1835625831);

CREATE OR REPLACE FUNCTION mimeo.installed_version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '0.6.0'::text $$;

------------------------------------------------------------------------------
-- Tables.
------------------------------------------------------------------------------

-- One row per check: a table's row counts or checksums, a table's source
-- columns, a table's source still there, a snap table's size. Finished
-- checks older than MIMEO_RETENTION are deleted by the agents, as requests.
CREATE TABLE mimeo.validation (
    id bigserial PRIMARY KEY,
    request_id bigint,
    dest_table text,
    kind text NOT NULL CHECK (kind IN ('rowcount', 'checksum', 'columns', 'missing', 'snapshot_monitor')),
    checked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ok boolean NOT NULL,
    source_rows bigint,
    dest_rows bigint,
    chunks_checked int,
    chunks_differing int,
    repaired boolean,
    detail text
);
CREATE INDEX validation_dest_table_idx ON mimeo.validation (dest_table, kind, id);
CREATE INDEX validation_request_idx ON mimeo.validation (request_id);
COMMENT ON TABLE mimeo.validation IS
    'Results of validate_rowcount, validate, check_source_columns, check_missing_source_tables and snapshot_monitor: one row per table checked. ok is false when the copy differed (even if repaired: see repaired).';
COMMENT ON COLUMN mimeo.validation.repaired IS
    'validate(p_repair => true): true once every differing chunk was re-pulled and then matched; NULL when no repair was asked.';

-- max_runs: how many runs may read from one source at once, over all
-- agents, so one busy source cannot take every worker or be overloaded.
ALTER TABLE mimeo.dblink_mapping ADD COLUMN max_runs int NOT NULL DEFAULT 4 CHECK (max_runs > 0);
COMMENT ON COLUMN mimeo.dblink_mapping.max_runs IS
    'How many requests reading this source may run at once, over all agents (the logical stream aside).';

------------------------------------------------------------------------------
-- Claiming: oldest first, at most max_runs per source.
------------------------------------------------------------------------------

-- The source a request reads: its table's, or a maker's dblink argument.
CREATE FUNCTION mimeo.request_source(p_dest_table text, p_args jsonb) RETURNS int
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT c.dblink FROM mimeo.refresh_config c WHERE c.dest_table = p_dest_table),
                    CASE WHEN jsonb_typeof(p_args->'dblink') = 'number' THEN (p_args->>'dblink')::int END)
$$;

-- Marks up to p_limit queued requests running by agent p_agent_id and
-- returns them, oldest first, skipping those whose source already runs
-- its max_runs. Claims are serialized (one short lock), so two agents
-- claiming at once cannot both take a source's last free run; rows
-- another session holds (FOR UPDATE SKIP LOCKED) are passed over.
CREATE FUNCTION mimeo.claim(p_agent_id bigint, p_limit int) RETURNS SETOF mimeo.request
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(mimeo.agent_lock_key(), -2);
    RETURN QUERY
    WITH busy AS (
        SELECT mimeo.request_source(r.dest_table, r.args) AS dblink, count(*) AS n
        FROM mimeo.request r WHERE r.status = 'running' GROUP BY 1
    ), queued AS (
        SELECT r.id, mimeo.request_source(r.dest_table, r.args) AS dblink
        FROM mimeo.request r WHERE r.status = 'queued'
        ORDER BY r.id LIMIT greatest(p_limit, 0) * 50 + 100
        FOR UPDATE OF r SKIP LOCKED
    ), ranked AS (
        SELECT q.id, q.dblink, row_number() OVER (PARTITION BY q.dblink ORDER BY q.id) AS rn FROM queued q
    ), next AS (
        SELECT k.id FROM ranked k
        LEFT JOIN busy b ON b.dblink = k.dblink
        LEFT JOIN mimeo.dblink_mapping m ON m.data_source_id = k.dblink
        WHERE k.dblink IS NULL OR m.data_source_id IS NULL OR coalesce(b.n, 0) + k.rn <= m.max_runs
        ORDER BY k.id LIMIT greatest(p_limit, 0)
    )
    UPDATE mimeo.request r
    SET status = 'running', started_at = clock_timestamp(), agent_id = p_agent_id,
        attempts = r.attempts + 1, finished_at = NULL
    FROM next WHERE r.id = next.id AND r.status = 'queued'
    RETURNING r.*;
END
$$;

------------------------------------------------------------------------------
-- Checks.
------------------------------------------------------------------------------

-- Raises unless p_dest_table is a replicated table.
CREATE FUNCTION mimeo.check_replicated(p_dest_table text) RETURNS text
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
    RETURN v_type;
END
$$;

-- Raises unless p_dest_table is replicated as type p_type.
CREATE OR REPLACE FUNCTION mimeo.check_config(p_dest_table text, p_type text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_type text := mimeo.check_replicated(p_dest_table);
BEGIN
    IF v_type <> p_type THEN
        RAISE EXCEPTION 'mimeo: % is replicated as type %, not %', p_dest_table, v_type, p_type
            USING ERRCODE = 'wrong_object_type';
    END IF;
END
$$;

-- Compares the row counts of source and destination over what is
-- replicated: the condition, for inserter and updater only up to
-- last_value, for logdel the live rows.
CREATE FUNCTION mimeo.validate_rowcount(p_destination text, p_debug boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_replicated(v_dest);
    RETURN mimeo.enqueue('validate_rowcount', v_dest, jsonb_build_object('debug', p_debug));
END
$$;

-- Compares the content of source and destination in key-range chunks by
-- checksum on both sides; with p_repair the differing chunks are re-pulled.
CREATE FUNCTION mimeo.validate(p_destination text, p_repair boolean DEFAULT false, p_debug boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_replicated(v_dest);
    RETURN mimeo.enqueue('validate', v_dest, jsonb_build_object(
        'repair', coalesce(p_repair, false), 'debug', p_debug));
END
$$;

-- Every replicated table whose source columns no longer match its
-- destination.
CREATE FUNCTION mimeo.check_source_columns(p_debug boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN mimeo.enqueue('check_source_columns', NULL, jsonb_build_object('debug', p_debug));
END
$$;

-- Every replicated table whose source table is gone.
CREATE FUNCTION mimeo.check_missing_source_tables(p_debug boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN mimeo.enqueue('check_missing_source_tables', NULL, jsonb_build_object('debug', p_debug));
END
$$;

-- Snap tables whose source has at least p_rowcount rows or p_size bytes
-- (all snap tables when both are NULL), with how much of them changed
-- since their last copy: large, rarely changed tables are better served by
-- a type that moves only the changes.
CREATE FUNCTION mimeo.snapshot_monitor(
    p_rowcount bigint DEFAULT NULL,
    p_size bigint DEFAULT NULL,
    p_destination text DEFAULT NULL,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text;
BEGIN
    IF p_rowcount < 0 OR p_size < 0 THEN
        RAISE EXCEPTION 'mimeo: p_rowcount and p_size must not be negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_destination IS NOT NULL THEN
        v_dest := mimeo.qualified_name(p_destination, 'p_destination');
        PERFORM mimeo.check_config(v_dest, 'snap');
    END IF;
    RETURN mimeo.enqueue('snapshot_monitor', v_dest, jsonb_build_object(
        'rowcount', p_rowcount, 'size', p_size, 'debug', p_debug));
END
$$;

-- Raises a WARNING for each failed check of a finished request.
CREATE FUNCTION mimeo.report_validation(p_request_id bigint) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v mimeo.validation;
BEGIN
    FOR v IN SELECT * FROM mimeo.validation WHERE request_id = p_request_id AND NOT ok ORDER BY id LOOP
        RAISE WARNING 'mimeo: % %: %', v.kind, coalesce(v.dest_table, ''), v.detail;
    END LOOP;
END
$$;

-- Commits the caller's transaction, waits for the request and reports the
-- checks that failed.
CREATE PROCEDURE mimeo.commit_and_report(p_request_id bigint, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(p_request_id, p_timeout);
    PERFORM mimeo.report_validation(p_request_id);
END
$$;

CREATE PROCEDURE mimeo.validate_rowcount_wait(
    p_destination text, p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_report(mimeo.validate_rowcount(p_destination, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.validate_wait(
    p_destination text, p_repair boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_report(mimeo.validate(p_destination, p_repair, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.check_source_columns_wait(p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_report(mimeo.check_source_columns(p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.check_missing_source_tables_wait(p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_report(mimeo.check_missing_source_tables(p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.snapshot_monitor_wait(
    p_rowcount bigint DEFAULT NULL, p_size bigint DEFAULT NULL, p_destination text DEFAULT NULL,
    p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_report(mimeo.snapshot_monitor(p_rowcount, p_size, p_destination, p_debug), p_timeout);
END
$$;

------------------------------------------------------------------------------
-- refresh_snap(p_force): copy even when the source looks unchanged; the
-- destroyers that touch the source (dml, logdel, logical) gain p_force:
-- remove the destination side even when the source cannot be reached. The
-- grants DBAs gave on the old signatures are given to the new ones, and a
-- role that may CALL the waiting procedures may show their steps (see
-- mimeo.notice_steps below).
------------------------------------------------------------------------------

SELECT pg_catalog.set_config('mimeo.upgrade_routine_grants', coalesce((
    SELECT jsonb_agg(jsonb_build_object('routine', p.proname, 'grantee', a.grantee::regrole::text,
                                        'grantable', a.is_grantable))
    FROM pg_catalog.pg_proc p
    CROSS JOIN LATERAL aclexplode(p.proacl) a
    WHERE p.pronamespace = 'mimeo'::regnamespace
      AND p.proname IN ('refresh_snap', 'refresh_snap_wait', 'commit_and_wait', 'dml_destroyer', 'dml_destroyer_wait',
                        'logdel_destroyer', 'logdel_destroyer_wait', 'logical_destroyer', 'logical_destroyer_wait')
      AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner), '[]')::text, true);

DROP PROCEDURE mimeo.refresh_snap_wait(text, boolean, boolean, boolean, interval);
DROP FUNCTION mimeo.refresh_snap(text, boolean, boolean, boolean);
DROP PROCEDURE mimeo.dml_destroyer_wait(text, text, interval);
DROP FUNCTION mimeo.dml_destroyer(text, text);
DROP PROCEDURE mimeo.logdel_destroyer_wait(text, text, interval);
DROP FUNCTION mimeo.logdel_destroyer(text, text);
DROP PROCEDURE mimeo.logical_destroyer_wait(text, text, interval);
DROP FUNCTION mimeo.logical_destroyer(text, text);

-- p_force: when the source cannot be reached, or its objects cannot be
-- removed, the destination side is removed all the same, and the request's
-- message gives the SQL that removes what is left on the source.
CREATE FUNCTION mimeo.dml_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL, p_force boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'dml');
    RETURN mimeo.enqueue('dml_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option), 'force', coalesce(p_force, false)));
END
$$;

CREATE FUNCTION mimeo.logdel_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL, p_force boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'logdel');
    RETURN mimeo.enqueue('logdel_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option), 'force', coalesce(p_force, false)));
END
$$;

CREATE FUNCTION mimeo.logical_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL, p_force boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'logical');
    RETURN mimeo.enqueue('logical_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option), 'force', coalesce(p_force, false)));
END
$$;

CREATE PROCEDURE mimeo.dml_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour', p_force boolean DEFAULT false)
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.dml_destroyer(p_dest_table, p_archive_option, p_force), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.logdel_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour', p_force boolean DEFAULT false)
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logdel_destroyer(p_dest_table, p_archive_option, p_force), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.logical_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour', p_force boolean DEFAULT false)
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logical_destroyer(p_dest_table, p_archive_option, p_force), p_timeout);
END
$$;

CREATE FUNCTION mimeo.refresh_snap(
    p_destination text,
    p_debug boolean DEFAULT false,
    p_pulldata boolean DEFAULT true,
    p_jobmon boolean DEFAULT NULL,
    p_force boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.ignored_options(p_jobmon);
    PERFORM mimeo.check_config(v_dest, 'snap');
    RETURN mimeo.enqueue('refresh_snap', v_dest, jsonb_build_object('debug', p_debug, 'pulldata', p_pulldata,
        'force', coalesce(p_force, false)));
END
$$;

CREATE PROCEDURE mimeo.refresh_snap_wait(
    p_destination text, p_debug boolean DEFAULT false, p_pulldata boolean DEFAULT true,
    p_jobmon boolean DEFAULT NULL, p_timeout interval DEFAULT '1 hour', p_force boolean DEFAULT false)
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_snap(p_destination, p_debug, p_pulldata, p_jobmon, p_force), p_timeout);
END
$$;


------------------------------------------------------------------------------
-- Waiting with p_debug shows the run's steps as they are logged.
------------------------------------------------------------------------------

-- For a request made with p_debug: raises a NOTICE for each step of its
-- job after step p_after, and returns the last step shown. Without
-- p_debug: returns -1 (nothing to show, ever).
CREATE FUNCTION mimeo.notice_steps(p_request_id bigint, p_after int) RETURNS int
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s record;
    v_last int := p_after;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM mimeo.request WHERE id = p_request_id AND (args->>'debug')::boolean) THEN
        RETURN -1;
    END IF;
    FOR s IN
        SELECT d.step_id, d.action, d.status, d.message, d.elapsed_time
        FROM mimeo.job_log j JOIN mimeo.job_detail d ON d.job_id = j.job_id
        WHERE j.request_id = p_request_id AND d.step_id > p_after
        ORDER BY j.job_id DESC, d.step_id
    LOOP
        RAISE NOTICE 'mimeo: % [%, %s]: %', s.action, s.status, round(s.elapsed_time::numeric, 3), coalesce(s.message, '');
        v_last := greatest(v_last, s.step_id);
    END LOOP;
    RETURN v_last;
END
$$;

CREATE OR REPLACE PROCEDURE mimeo.commit_and_wait(p_request_id bigint, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
DECLARE
    r mimeo.request;
    v_timeout interval := coalesce(p_timeout, '1 hour');
    v_deadline timestamptz;
    v_sleep float8 := 0.001;
    v_step int := 0;
BEGIN
    COMMIT;
    v_deadline := clock_timestamp() + v_timeout;
    LOOP
        r := mimeo.wait_poll(p_request_id, v_deadline, v_timeout);
        IF v_step >= 0 THEN
            v_step := mimeo.notice_steps(p_request_id, v_step);
        END IF;
        EXIT WHEN r.id IS NOT NULL;
        COMMIT;
        PERFORM pg_sleep(least(v_sleep, greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0.001)));
        v_sleep := least(v_sleep * 1.5, 0.05);
    END LOOP;
    RAISE NOTICE 'mimeo: request % % %: %', r.id, r.action, r.status, coalesce(r.message, '');
END
$$;

------------------------------------------------------------------------------
-- refresh_status: runs of checks are not refreshes; why a table is not
-- healthy.
------------------------------------------------------------------------------

-- Actions that check a table rather than refresh it (for the agents'
-- housekeeping; refresh_status spells the list out, so that its readers
-- need no EXECUTE right).
CREATE FUNCTION mimeo.is_check_action(p_action text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_action IN ('validate', 'validate_rowcount', 'check_source_columns', 'check_missing_source_tables', 'snapshot_monitor')
$$;

-- Job names of checks (see mimeo.is_check_action).
CREATE FUNCTION mimeo.is_check_job(p_job_name text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_job_name ~ '^(Validate|Validate Rowcount|Check Source Columns|Check Missing Source Tables|Snapshot Monitor):'
$$;

CREATE OR REPLACE VIEW mimeo.refresh_status AS
SELECT c.dest_table,
       c.type,
       c.dblink,
       c.source_table,
       coalesce(s.applied_at, c.last_run) AS last_run,
       ok.end_time AS last_success,
       bad.error AS last_error,
       bad.finished_at AS last_error_at,
       now() - coalesce(s.applied_at, c.last_run) AS lag,
       c.period,
       pending.status AS pending,
       coalesce(i.last_value, u.last_value) AS last_value,
       CASE WHEN l.state = 'ready' AND s.status IN ('error', 'needs_resync') THEN s.status ELSE l.state END AS logical_state,
       coalesce(l.state_detail, CASE WHEN s.status IN ('error', 'needs_resync') THEN s.status_detail END) AS logical_detail,
       s.applied_lsn,
       s.retained_bytes AS retained_wal_bytes,
       v.checked_at AS last_validated_at,
       v.ok AS last_validation_ok,
       h.health,
       h.why
FROM mimeo.refresh_config c
LEFT JOIN mimeo.refresh_config_inserter i ON i.dest_table = c.dest_table AND c.type = 'inserter'
LEFT JOIN mimeo.refresh_config_updater u ON u.dest_table = c.dest_table AND c.type = 'updater'
LEFT JOIN mimeo.refresh_config_logical l ON l.dest_table = c.dest_table AND c.type = 'logical'
LEFT JOIN mimeo.logical_source s ON s.dblink = l.dblink AND l.state = 'ready'
LEFT JOIN mimeo.logical_source ls ON ls.dblink = l.dblink
LEFT JOIN LATERAL (
    SELECT j.end_time FROM mimeo.job_log j
    WHERE j.dest_table = c.dest_table AND j.status = 'OK'
      AND j.job_name !~ '^(Validate|Validate Rowcount|Check Source Columns|Check Missing Source Tables|Snapshot Monitor):'
    ORDER BY j.job_id DESC LIMIT 1) ok ON true
LEFT JOIN LATERAL (
    SELECT r.error, r.finished_at FROM mimeo.request r
    WHERE r.dest_table = c.dest_table AND r.status = 'failed'
      AND r.action NOT IN ('validate', 'validate_rowcount', 'check_source_columns', 'check_missing_source_tables', 'snapshot_monitor')
      AND r.finished_at > coalesce(ok.end_time, '-infinity')
    ORDER BY r.id DESC LIMIT 1) bad ON true
LEFT JOIN LATERAL (
    SELECT r.status FROM mimeo.request r
    WHERE r.dest_table = c.dest_table AND r.status IN ('queued', 'running')
    ORDER BY r.id DESC LIMIT 1) pending ON true
LEFT JOIN LATERAL (
    -- The newest check of each kind: a passing row count does not clear a
    -- failed checksum, but a checksum check supersedes the row counts
    -- before it. ok: each passed, or its difference was repaired.
    SELECT max(x.checked_at) AS checked_at, bool_and(x.ok OR coalesce(x.repaired, false)) AS ok,
           string_agg(x.kind || ' at ' || x.checked_at || ': ' || coalesce(x.detail, ''), '; ' ORDER BY x.kind)
               FILTER (WHERE NOT (x.ok OR coalesce(x.repaired, false))) AS detail
    FROM (SELECT DISTINCT ON (y.kind) y.kind, y.checked_at, y.ok, y.repaired, y.detail FROM mimeo.validation y
          WHERE y.dest_table = c.dest_table AND y.kind IN ('rowcount', 'checksum', 'columns', 'missing')
            AND NOT (y.kind = 'rowcount' AND y.id < (SELECT max(z.id) FROM mimeo.validation z
                                                     WHERE z.dest_table = c.dest_table AND z.kind = 'checksum'))
          ORDER BY y.kind, y.id DESC) x) v ON true
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN l.state IN ('failed', 'needs_resync') THEN 'failing'
        WHEN ls.status IN ('error', 'needs_resync') THEN 'failing'
        WHEN bad.error IS NOT NULL THEN 'failing'
        WHEN v.ok = false THEN 'invalid'
        WHEN c.type = 'logical' THEN 'ok'
        WHEN c.period IS NOT NULL AND ok.end_time IS NULL AND c.last_run IS NULL THEN 'never run'
        WHEN c.period IS NOT NULL AND coalesce(ok.end_time, c.last_run) < now() - 2 * c.period THEN 'overdue'
        ELSE 'ok' END AS health) h0
CROSS JOIN LATERAL (
    SELECT h0.health,
           CASE h0.health
               WHEN 'failing' THEN coalesce(l.state_detail, CASE WHEN ls.status IN ('error', 'needs_resync') THEN ls.status_detail END,
                                            bad.error, 'logical state ' || l.state)
               WHEN 'invalid' THEN 'the last check found a difference: ' || coalesce(v.detail, '')
               WHEN 'never run' THEN 'no run has succeeded yet (period ' || c.period || ')'
               WHEN 'overdue' THEN 'last success ' || coalesce(ok.end_time, c.last_run) || ', more than twice its period ('
                                   || c.period || ') ago'
           END AS why) h;

COMMENT ON VIEW mimeo.refresh_status IS
    'One row per replicated table: what it is, its last run, success and error, its lag, its last check, and health: ok, failing (last run failed, or the logical stream cannot go on), invalid (the last check found a difference not repaired), overdue (no success for twice its period) or never run; why says why.';

------------------------------------------------------------------------------
-- Privileges.
------------------------------------------------------------------------------

-- Nothing here is for everyone (see 0.1.0).
REVOKE ALL ON ALL ROUTINES IN SCHEMA mimeo FROM PUBLIC;
REVOKE ALL ON mimeo.validation FROM PUBLIC;

-- Give back the grants the re-created routines had; a role that may CALL
-- commit_and_wait may now show steps with notice_steps too.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT CASE WHEN r->>'routine' = 'commit_and_wait' THEN 'notice_steps' ELSE r->>'routine' END AS routine,
               r->>'grantee' AS grantee,
               (r->>'grantable')::boolean AND r->>'routine' <> 'commit_and_wait' AS grantable
        FROM jsonb_array_elements(current_setting('mimeo.upgrade_routine_grants')::jsonb) r
    LOOP
        EXECUTE format('GRANT EXECUTE ON ROUTINE mimeo.%I TO %s%s', g.routine, g.grantee,
                       CASE WHEN g.grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;
