-- mimeo 0.2.0 -> 0.3.0: dml and logdel replication through source trigger queues.
--
-- The maker creates, in the source's mimeo schema (owned by the replication
-- role), a queue table, a trigger function and statement-level triggers
-- that queue the keys of every inserted, updated and deleted row. A refresh
-- replays the queued keys: the destination deletes them and inserts the
-- source's current rows. logdel keeps deleted rows, marked.

\echo Use "ALTER EXTENSION mimeo UPDATE" or "mimeo-agent install" to load this file. \quit

-- This destination's identity: it keeps the source objects of two
-- destinations replicating one source table apart.
CREATE TABLE mimeo.instance (
    id text PRIMARY KEY DEFAULT replace(gen_random_uuid()::text, '-', ''),
    one boolean NOT NULL DEFAULT true UNIQUE CHECK (one)
);
INSERT INTO mimeo.instance DEFAULT VALUES;

-- queue_table, trigger_function and triggers name the source objects this
-- table's destroyer removes (and no other destination's).
CREATE TABLE mimeo.refresh_config_dml (
    pk_field text[] NOT NULL,
    pk_type text[] NOT NULL,
    queue_table text NOT NULL,
    trigger_function text NOT NULL,
    triggers text[] NOT NULL,
    CONSTRAINT refresh_config_dml_pkey PRIMARY KEY (dest_table),
    CONSTRAINT refresh_config_dml_dblink_fkey FOREIGN KEY (dblink)
        REFERENCES mimeo.dblink_mapping (data_source_id),
    CONSTRAINT refresh_config_dml_type_check CHECK (type = 'dml')
) INHERITS (mimeo.refresh_config);

CREATE TABLE mimeo.refresh_config_logdel (
    pk_field text[] NOT NULL,
    pk_type text[] NOT NULL,
    queue_table text NOT NULL,
    trigger_function text NOT NULL,
    triggers text[] NOT NULL,
    CONSTRAINT refresh_config_logdel_pkey PRIMARY KEY (dest_table),
    CONSTRAINT refresh_config_logdel_dblink_fkey FOREIGN KEY (dblink)
        REFERENCES mimeo.dblink_mapping (data_source_id),
    CONSTRAINT refresh_config_logdel_type_check CHECK (type = 'logdel')
) INHERITS (mimeo.refresh_config);

CREATE TRIGGER refresh_config_unique BEFORE INSERT OR UPDATE OF dest_table ON mimeo.refresh_config_dml
    FOR EACH ROW EXECUTE FUNCTION mimeo.refresh_config_unique();
CREATE TRIGGER refresh_config_unique BEFORE INSERT OR UPDATE OF dest_table ON mimeo.refresh_config_logdel
    FOR EACH ROW EXECUTE FUNCTION mimeo.refresh_config_unique();

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
    RETURN mimeo.enqueue('dml_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', p_pulldata, 'pk_field', p_pk_field,
        'pk_type', p_pk_type, 'index', p_index, 'filter', p_filter, 'condition', p_condition, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_dml(
    p_destination text,
    p_limit int DEFAULT NULL,
    p_repull boolean DEFAULT false,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'dml');
    PERFORM mimeo.check_incremental_refresh(p_limit, p_repull, NULL, NULL);
    RETURN mimeo.enqueue('refresh_dml', v_dest, jsonb_build_object(
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

CREATE PROCEDURE mimeo.dml_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL, p_pk_type text[] DEFAULT NULL, p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.dml_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_pk_field, p_pk_type, p_index, p_filter, p_condition, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_dml_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_dml(p_destination, p_limit, p_repull, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.dml_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.dml_destroyer(p_dest_table, p_archive_option), p_timeout);
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
    RETURN mimeo.enqueue('logdel_maker', v_dest, jsonb_build_object(
        'src_table', v_src, 'dblink', p_dblink_id, 'pulldata', p_pulldata, 'pk_field', p_pk_field,
        'pk_type', p_pk_type, 'index', p_index, 'filter', p_filter, 'condition', p_condition, 'debug', p_debug));
END
$$;

CREATE FUNCTION mimeo.refresh_logdel(
    p_destination text,
    p_limit int DEFAULT NULL,
    p_repull boolean DEFAULT false,
    p_debug boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dest text := mimeo.qualified_name(p_destination, 'p_destination');
BEGIN
    PERFORM mimeo.check_config(v_dest, 'logdel');
    PERFORM mimeo.check_incremental_refresh(p_limit, p_repull, NULL, NULL);
    RETURN mimeo.enqueue('refresh_logdel', v_dest, jsonb_build_object(
        'limit', p_limit, 'repull', p_repull, 'debug', p_debug));
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

CREATE PROCEDURE mimeo.logdel_maker_wait(
    p_src_table text, p_dblink_id int, p_dest_table text DEFAULT NULL, p_pulldata boolean DEFAULT true,
    p_pk_field text[] DEFAULT NULL, p_pk_type text[] DEFAULT NULL, p_index boolean DEFAULT true,
    p_filter text[] DEFAULT NULL, p_condition text DEFAULT NULL, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logdel_maker(p_src_table, p_dblink_id, p_dest_table, p_pulldata,
        p_pk_field, p_pk_type, p_index, p_filter, p_condition, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.refresh_logdel_wait(
    p_destination text, p_limit int DEFAULT NULL, p_repull boolean DEFAULT false, p_debug boolean DEFAULT false,
    p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.refresh_logdel(p_destination, p_limit, p_repull, p_debug), p_timeout);
END
$$;

CREATE PROCEDURE mimeo.logdel_destroyer_wait(
    p_dest_table text, p_archive_option text DEFAULT NULL, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
BEGIN
    CALL mimeo.commit_and_wait(mimeo.logdel_destroyer(p_dest_table, p_archive_option), p_timeout);
END
$$;

-- run_refresh learns dml and logdel.
CREATE OR REPLACE FUNCTION mimeo.run_refresh(p_type text, p_batch int DEFAULT 4, p_debug boolean DEFAULT false)
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

-- Nothing here is for everyone (see 0.1.0).
REVOKE ALL ON ALL ROUTINES IN SCHEMA mimeo FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('mimeo.instance', '');
SELECT pg_catalog.pg_extension_config_dump('mimeo.refresh_config_dml', '');
SELECT pg_catalog.pg_extension_config_dump('mimeo.refresh_config_logdel', '');
