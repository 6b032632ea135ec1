-- mimeo 0.7.0 -> 0.8.0: a logical table notices a partition's TRUNCATE.
--
-- pgoutput does not send a TRUNCATE of one partition of a table published
-- through its root, so a partitioned logical table kept the rows the source
-- had emptied. Each partition's relfilenode at the copy is now kept
-- (partition_files, parallel to partitions): the agent compares them with
-- the source's, and a partition whose storage changed (TRUNCATE, or a
-- rewrite: VACUUM FULL, CLUSTER, an ALTER TABLE that rewrites) has its
-- table compared with the source; a difference fails the table.

\echo Use "ALTER EXTENSION mimeo UPDATE" or "mimeo-agent install" to load this file. \quit

-- Runs of agents hold this lock shared: an upgrade waits for them.
SELECT pg_catalog.pg_advisory_xact_lock(1835625831);

CREATE OR REPLACE FUNCTION mimeo.installed_version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '0.8.0'::text $$;

-- partition_files: the relfilenode of each of partitions, in its order, as
-- of the copy's snapshot (NULL for a table copied by an earlier agent: its
-- first check records them).
ALTER TABLE mimeo.refresh_config_logical ADD COLUMN partition_files bigint[];

-- A failed request whose error ends with the agent's "(HINT: ...)" is
-- raised with that text as the error's HINT field, where psql shows it on a
-- line of its own; the request row keeps the whole text.
CREATE OR REPLACE FUNCTION mimeo.raise_outcome(r mimeo.request) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_hint text := substring(r.error FROM '\(HINT: (.*)\)$');
BEGIN
    IF r.status = 'failed' AND v_hint IS NOT NULL THEN
        RAISE EXCEPTION 'mimeo: request % (% %) failed: %', r.id, r.action, r.dest_table,
            left(r.error, length(r.error) - length(v_hint) - length(' (HINT: )'))
            USING ERRCODE = 'external_routine_exception', HINT = v_hint;
    ELSIF r.status = 'failed' THEN
        RAISE EXCEPTION 'mimeo: request % (% %) failed: %', r.id, r.action, r.dest_table, r.error
            USING ERRCODE = 'external_routine_exception';
    ELSIF r.status = 'skipped' THEN
        RAISE WARNING 'mimeo: request % (% %) skipped: %', r.id, r.action, r.dest_table, r.message;
    END IF;
END
$$;
