-- mimeo 0.1.0 -> 0.2.0: incremental replication by a control column.
--
-- inserter copies rows whose control value (a timestamp set on insert, or a
-- serial) passed last_value; updater does the same and upserts by a key, so
-- a control column also set on update brings updated rows along.

\echo Use "ALTER EXTENSION mimeo UPDATE" or "mimeo-agent install" to load this file. \quit

-- control_type: timestamptz or timestamp (boundary is an interval, or
-- 'auto'), or serial (boundary is an integer). last_value is kept as text in
-- a canonical form (UTC with +00 for timestamptz) and cast where compared.
CREATE TABLE mimeo.refresh_config_inserter (
    control text NOT NULL,
    control_type text NOT NULL CHECK (control_type IN ('timestamptz', 'timestamp', 'serial')),
    boundary text NOT NULL,
    last_value text,
    dst_active boolean NOT NULL DEFAULT false,
    dst_start int NOT NULL DEFAULT 30 CHECK (dst_start BETWEEN 0 AND 2359),
    dst_end int NOT NULL DEFAULT 230 CHECK (dst_end BETWEEN 0 AND 2359),
    CONSTRAINT refresh_config_inserter_pkey PRIMARY KEY (dest_table),
    CONSTRAINT refresh_config_inserter_dblink_fkey FOREIGN KEY (dblink)
        REFERENCES mimeo.dblink_mapping (data_source_id),
    CONSTRAINT refresh_config_inserter_type_check CHECK (type = 'inserter')
) INHERITS (mimeo.refresh_config);

CREATE TABLE mimeo.refresh_config_updater (
    control text NOT NULL,
    control_type text NOT NULL CHECK (control_type IN ('timestamptz', 'timestamp', 'serial')),
    boundary text NOT NULL,
    last_value text,
    dst_active boolean NOT NULL DEFAULT false,
    dst_start int NOT NULL DEFAULT 30 CHECK (dst_start BETWEEN 0 AND 2359),
    dst_end int NOT NULL DEFAULT 230 CHECK (dst_end BETWEEN 0 AND 2359),
    pk_field text[] NOT NULL,
    pk_type text[] NOT NULL,
    CONSTRAINT refresh_config_updater_pkey PRIMARY KEY (dest_table),
    CONSTRAINT refresh_config_updater_dblink_fkey FOREIGN KEY (dblink)
        REFERENCES mimeo.dblink_mapping (data_source_id),
    CONSTRAINT refresh_config_updater_type_check CHECK (type = 'updater'),
    CONSTRAINT refresh_config_updater_pk_check CHECK (cardinality(pk_field) = cardinality(pk_type) AND cardinality(pk_field) > 0)
) INHERITS (mimeo.refresh_config);

CREATE TRIGGER refresh_config_unique BEFORE INSERT OR UPDATE OF dest_table ON mimeo.refresh_config_inserter
    FOR EACH ROW EXECUTE FUNCTION mimeo.refresh_config_unique();
CREATE TRIGGER refresh_config_unique BEFORE INSERT OR UPDATE OF dest_table ON mimeo.refresh_config_updater
    FOR EACH ROW EXECUTE FUNCTION mimeo.refresh_config_unique();

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

-- Raises unless a maker may configure p_dest_table: not replicated yet. For
-- incremental types the destination table itself may already exist.
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
            USING ERRCODE = 'invalid_schema_name';
    END IF;
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

-- Raises on refresh arguments that cannot work.
CREATE FUNCTION mimeo.check_incremental_refresh(p_limit int, p_repull boolean, p_repull_start text, p_repull_end text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_limit IS NOT NULL AND p_limit < 1 THEN
        RAISE EXCEPTION 'mimeo: p_limit must be at least 1, got %', p_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT coalesce(p_repull, false) AND (p_repull_start IS NOT NULL OR p_repull_end IS NOT NULL) THEN
        RAISE EXCEPTION 'mimeo: p_repull_start and p_repull_end need p_repull => true'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

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
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
    IF p_control_field IS NULL OR p_control_field = '' THEN
        RAISE EXCEPTION 'mimeo: p_control_field is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM mimeo.check_boundary(p_boundary);
    PERFORM mimeo.check_dblink(p_dblink_id);
    PERFORM mimeo.check_not_configured(v_dest);
    RETURN mimeo.enqueue('inserter_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'control', p_control_field, 'dblink', p_dblink_id, 'boundary', p_boundary,
        'pulldata', p_pulldata, 'index', p_index, 'filter', p_filter, 'condition', p_condition, 'debug', p_debug));
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
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_src text := mimeo.qualified_name(p_src_table, 'p_src_table');
    v_dest text := mimeo.qualified_name(coalesce(p_dest_table, p_src_table), 'p_dest_table');
BEGIN
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
        'filter', p_filter, 'condition', p_condition, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_inserter(
    p_destination text,
    p_limit int DEFAULT NULL,
    p_repull boolean DEFAULT false,
    p_repull_start text DEFAULT NULL,
    p_repull_end text DEFAULT NULL,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'inserter');
    PERFORM mimeo.check_incremental_refresh(p_limit, p_repull, p_repull_start, p_repull_end);
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
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'updater');
    PERFORM mimeo.check_incremental_refresh(p_limit, p_repull, p_repull_start, p_repull_end);
    RETURN mimeo.enqueue('refresh_updater', v_dest, jsonb_build_object(
        'limit', p_limit, 'repull', p_repull, 'repull_start', p_repull_start, 'repull_end', p_repull_end, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.inserter_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'inserter');
    RETURN mimeo.enqueue('inserter_destroyer', v_dest, jsonb_build_object(
        'archive', upper(coalesce(p_archive_option, '')) = 'ARCHIVE'));
END
$$;

CREATE FUNCTION mimeo.updater_destroyer(p_dest_table text, p_archive_option text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_dest_table, 'p_dest_table');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'updater');
    RETURN mimeo.enqueue('updater_destroyer', v_dest, jsonb_build_object(
        'archive', upper(coalesce(p_archive_option, '')) = 'ARCHIVE'));
END
$$;

CREATE PROCEDURE mimeo.inserter_maker_wait(
    p_src_table text, p_control_field text, p_dblink_id int, p_boundary text DEFAULT NULL,
    p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true, p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.inserter_maker(p_src_table, p_control_field, p_dblink_id, p_boundary,
        p_dest_table, p_pulldata, p_index, p_filter, p_condition, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.updater_maker_wait(
    p_src_table text, p_control_field text, p_dblink_id int, p_boundary text DEFAULT NULL,
    p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true, p_pk_field text[] DEFAULT NULL,
    p_pk_type text[] DEFAULT NULL, p_index boolean DEFAULT true, p_filter text[] DEFAULT NULL,
    p_condition text DEFAULT NULL, p_debug boolean DEFAULT false, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.updater_maker(p_src_table, p_control_field, p_dblink_id, p_boundary,
        p_dest_table, p_pulldata, p_pk_field, p_pk_type, p_index, p_filter, p_condition, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_inserter_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false,
    p_repull_start text DEFAULT NULL, p_repull_end text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_inserter(p_destination, p_limit, p_repull,
        p_repull_start, p_repull_end, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_updater_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false,
    p_repull_start text DEFAULT NULL, p_repull_end text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_updater(p_destination, p_limit, p_repull,
        p_repull_start, p_repull_end, p_debug), p_timeout);
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

-- run_refresh learns the incremental types.
CREATE OR REPLACE FUNCTION mimeo.run_refresh(p_type text, p_batch int DEFAULT 4, p_debug boolean DEFAULT false)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_dest text;
BEGIN
    IF p_type IS NULL OR p_type NOT IN ('snap', 'table', 'inserter', 'updater') THEN
        RAISE EXCEPTION 'mimeo: unknown replication type %', quote_literal(p_type)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Known types: snap, table, inserter, updater.';
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
        ORDER BY c.last_run NULLS FIRST, c.dest_table
        LIMIT greatest(coalesce(p_batch, 4), 0)
    LOOP
        RETURN NEXT mimeo.enqueue('refresh_' || p_type, v_dest, jsonb_build_object('debug', p_debug));
    END LOOP;
END
$$;

-- The status view gains the incremental types' last_value (new columns go
-- at the end, as CREATE OR REPLACE VIEW requires).
CREATE OR REPLACE VIEW mimeo.refresh_status AS
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
       pending.status AS pending,
       coalesce(i.last_value, u.last_value) AS last_value
FROM mimeo.refresh_config c
LEFT JOIN mimeo.refresh_config_inserter i ON i.dest_table = c.dest_table AND c.type = 'inserter'
LEFT JOIN mimeo.refresh_config_updater u ON u.dest_table = c.dest_table AND c.type = 'updater'
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

SELECT pg_catalog.pg_extension_config_dump('mimeo.refresh_config_inserter', '');
SELECT pg_catalog.pg_extension_config_dump('mimeo.refresh_config_updater', '');
