-- mimeo 0.4.0 -> 0.5.0: the logical replication type.
--
-- A logical table is kept fresh by the running agent from one logical
-- replication slot (pgoutput) and one publication per source database; no
-- refresh call and no trigger on the source is needed. refresh_logical is a
-- sync point, or with p_repull a fresh copy.

\echo Use "ALTER EXTENSION mimeo UPDATE" or "mimeo-agent install" to load this file. \quit

-- Runs of agents hold this lock shared: an upgrade waits for them.
SELECT pg_catalog.pg_advisory_xact_lock(1835625831);

CREATE OR REPLACE FUNCTION mimeo.installed_version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '0.5.0'::text $$;

------------------------------------------------------------------------------
-- Tables.
------------------------------------------------------------------------------

-- One row per source database streamed into this destination: its slot and
-- publication, and how far the destination has applied its changes.
-- applied_lsn moves in the same transaction as the changes it covers, so a
-- restarted agent resumes exactly there.
CREATE TABLE mimeo.logical_source (
    dblink int PRIMARY KEY REFERENCES mimeo.dblink_mapping (data_source_id),
    slot_name text NOT NULL UNIQUE,
    publication text NOT NULL,
    system_identifier text,
    applied_lsn pg_lsn,
    applied_at timestamptz,
    last_commit_at timestamptz,
    status text NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'streaming', 'stopped', 'error', 'needs_resync')),
    status_detail text,
    retained_bytes bigint,
    checked_at timestamptz,
    sync_lsn pg_lsn
);
COMMENT ON TABLE mimeo.logical_source IS
    'Per source of logical tables: slot, publication, applied_lsn (end of the last source transaction applied), the WAL the slot retains and the stream''s status.';
COMMENT ON COLUMN mimeo.logical_source.status IS
    'new (no stream yet), streaming, stopped, error (retried; see status_detail) or needs_resync (the slot cannot continue where the destination stopped: repull every table).';

-- state: copying (the initial copy runs; the stream keeps the table's
-- changes in mimeo.logical_backlog), copied (the stream applies the backlog
-- next), ready (changes applied as they stream), failed or needs_resync (no
-- changes applied until refresh_logical(p_repull => true); see
-- state_detail). start_lsn: the copy's consistent point; only source
-- transactions committed at or after it are applied to the copy.
-- partitions: a partitioned source's partitions at the copy (ATTACH and
-- DETACH move rows without changes the stream could see).
CREATE TABLE mimeo.refresh_config_logical (
    pk_field text[] NOT NULL,
    pk_type text[] NOT NULL,
    logdel boolean NOT NULL DEFAULT false,
    columns text[],
    column_types text[],
    state text NOT NULL DEFAULT 'copying'
        CHECK (state IN ('copying', 'copied', 'ready', 'failed', 'needs_resync')),
    state_detail text,
    start_lsn pg_lsn,
    partitions text[],
    CONSTRAINT refresh_config_logical_pkey PRIMARY KEY (dest_table),
    CONSTRAINT refresh_config_logical_dblink_fkey FOREIGN KEY (dblink)
        REFERENCES mimeo.dblink_mapping (data_source_id),
    CONSTRAINT refresh_config_logical_type_check CHECK (type = 'logical')
) INHERITS (mimeo.refresh_config);
CREATE INDEX refresh_config_logical_source ON mimeo.refresh_config_logical (dblink, source_table);

CREATE TRIGGER refresh_config_unique BEFORE INSERT OR UPDATE OF dest_table ON mimeo.refresh_config_logical
    FOR EACH ROW EXECUTE FUNCTION mimeo.refresh_config_unique();

-- Changes of tables whose copy is running, in stream order, applied (from
-- start_lsn on) once the copy has committed.
CREATE TABLE mimeo.logical_backlog (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dest_table text NOT NULL REFERENCES mimeo.refresh_config_logical (dest_table) ON DELETE CASCADE,
    commit_lsn pg_lsn NOT NULL,
    commit_at timestamptz NOT NULL,
    op "char" NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    old_key jsonb,
    new_row jsonb,
    unchanged jsonb
);
CREATE INDEX logical_backlog_dest_table ON mimeo.logical_backlog (dest_table, seq);

------------------------------------------------------------------------------
-- The request path.
------------------------------------------------------------------------------

CREATE FUNCTION mimeo.logical_maker(
    p_src_table text,
    p_dblink_id int,
    p_dest_table text DEFAULT NULL,
    p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL,
    p_pk_type text[] DEFAULT NULL,
    p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL,
    p_logdel boolean DEFAULT false,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    PERFORM mimeo.check_pk(p_pk_field, p_pk_type);
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_new_destination(v_dest);
    RETURN mimeo.enqueue('logical_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', coalesce(p_pulldata, true), 'pk_field', p_pk_field,
        'pk_type', p_pk_type, 'index', p_index, 'filter', p_filter, 'condition', p_condition,
        'logdel', coalesce(p_logdel, false), 'debug', p_debug));
END
$$;

-- A sync point: the request ends done once every source transaction
-- committed before the agent took it has been applied to the table. With
-- p_repull the table is copied again (which also clears a failed or
-- needs_resync state).
CREATE FUNCTION mimeo.refresh_logical(
    p_destination text,
    p_repull boolean DEFAULT false,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'logical');
    RETURN mimeo.enqueue('refresh_logical', v_dest, jsonb_build_object(
        'repull', coalesce(p_repull, false), 'debug', p_debug));
END
$$;

-- Removes the table from the publication; the last table of a source also
-- takes its slot and publication along.
CREATE FUNCTION mimeo.logical_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'logical');
    RETURN mimeo.enqueue('logical_destroyer', v_dest, jsonb_build_object(
        'archive', mimeo.archive_option(p_archive_option)));
END
$$;

CREATE PROCEDURE mimeo.logical_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL, p_pk_type text[] DEFAULT NULL, p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL, p_logdel boolean DEFAULT false,
    p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logical_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_pk_field, p_pk_type, p_index, p_filter, p_condition, p_logdel, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_logical_wait(
    p_destination text, p_repull boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_logical(p_destination, p_repull, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.logical_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logical_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

------------------------------------------------------------------------------
-- Status.
------------------------------------------------------------------------------

-- Logical tables gain their stream's state (new columns go at the end, as
-- CREATE OR REPLACE VIEW requires). Their last_run is when the stream last
-- confirmed the table current, and lag is the time since then.
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
       s.retained_bytes AS retained_wal_bytes
FROM mimeo.refresh_config c
LEFT JOIN mimeo.refresh_config_inserter i ON i.dest_table = c.dest_table AND c.type = 'inserter'
LEFT JOIN mimeo.refresh_config_updater u ON u.dest_table = c.dest_table AND c.type = 'updater'
LEFT JOIN mimeo.refresh_config_logical l ON l.dest_table = c.dest_table AND c.type = 'logical'
LEFT JOIN mimeo.logical_source s ON s.dblink = l.dblink AND l.state = 'ready'
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

------------------------------------------------------------------------------
-- Privileges.
------------------------------------------------------------------------------

-- Nothing here is for everyone (see 0.1.0).
REVOKE ALL ON ALL ROUTINES IN SCHEMA mimeo FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('mimeo.logical_source', '');
SELECT pg_catalog.pg_extension_config_dump('mimeo.refresh_config_logical', '');
