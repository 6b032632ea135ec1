package agent_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// layout1 turns a table's source objects back into what mimeo 0.3.0 made
// (frozen here): a queue with one column per key (logdel: per column),
// statement triggers for insert, update and delete, and a row trigger whose
// WHEN clause queues the old key of a key change. The config says so too.
func (e *env) layout1(typ, dest string) {
	e.t.Helper()
	var queue, function string
	var trig []string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT queue_table, trigger_function, triggers FROM mimeo.refresh_config_`+typ+` WHERE dest_table = $1`, dest).
		Scan(&queue, &function, &trig))
	key := strings.TrimSuffix(trig[3], "_trunc") + "_key"
	cols, olds, deletion := `"id"`, `OLD."id"`, ``
	queueCols := `"id" integer`
	if typ == "logdel" {
		cols, olds = `"id", "v", "w"`, `OLD."id", OLD."v", OLD."w"`
		queueCols = `"id" integer, "v" integer, "w" text, "mimeo_deleted_at" timestamptz`
		deletion = `, "mimeo_deleted_at"`
	}
	onKey := fmt.Sprintf(`INSERT INTO %s (%s%s) VALUES (%s%s);`, queue, cols, deletion, olds, map[bool]string{true: ", clock_timestamp()", false: ""}[typ == "logdel"])
	onDelete := fmt.Sprintf(`INSERT INTO %s (%s%s) SELECT %s%s FROM old_rows;`, queue, cols, deletion, cols, map[bool]string{true: ", clock_timestamp()", false: ""}[typ == "logdel"])
	stmts := []string{
		`SET ROLE ` + replRole,
		`DROP FUNCTION ` + function + `() CASCADE`,
		`DROP TABLE ` + queue,
		`CREATE TABLE ` + queue + ` ("mimeo_claimed" bigint, ` + queueCols + `)`,
		`CREATE FUNCTION ` + function + `() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $mimeo$
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        ` + onKey + `
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO ` + queue + ` ("id") SELECT "id" FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO ` + queue + ` ("id") SELECT "id" FROM new_rows;
    ELSE
        ` + onDelete + `
    END IF;
    RETURN NULL;
END
$mimeo$`,
		fmt.Sprintf(`CREATE TRIGGER %q AFTER INSERT ON public.t REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()`, trig[0], function),
		fmt.Sprintf(`CREATE TRIGGER %q AFTER UPDATE ON public.t REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()`, trig[1], function),
		fmt.Sprintf(`CREATE TRIGGER %q AFTER DELETE ON public.t REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()`, trig[2], function),
		fmt.Sprintf(`CREATE TRIGGER %q AFTER UPDATE ON public.t FOR EACH ROW WHEN ((ROW(OLD."id")) IS DISTINCT FROM (ROW(NEW."id"))) EXECUTE FUNCTION %s()`, key, function),
		`RESET ROLE`,
	}
	e.exec(e.src, strings.Join(stmts, ";\n")) // one session: SET ROLE holds for all
	e.exec(e.dst, `UPDATE mimeo.refresh_config_`+typ+` SET source_layout = 1, trigger_tables = NULL, columns = NULL,
    triggers = ARRAY[triggers[1], triggers[2], triggers[3], $2] WHERE dest_table = $1`, dest, key)
}

// Source objects made by mimeo 0.3.0 are upgraded at the next run, keeping
// every change queued before, deleted rows' values included; after it the
// key may be retyped and TRUNCATE reaches the destination.
func TestSourceObjectsOfAnEarlierReleaseAreUpgraded(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int, w text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g, 'w' || g FROM generate_series(1, 40) g`)
	e.prepareTriggers("public.t")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	e.done(`SELECT mimeo.logdel_maker('public.t', $1, 'public.t_log')`, e.dblink)
	e.layout1("dml", "public.t")
	e.layout1("logdel", "public.t_log")
	e.exec(e.dst, `DROP INDEX public.t_log_mimeo_source_deleted`) // 0.3.0 made none

	e.exec(e.app, `UPDATE t SET v = -v WHERE id <= 5`)
	e.exec(e.app, `DELETE FROM t WHERE id IN (6, 7)`)
	e.exec(e.app, `UPDATE t SET id = 1000 WHERE id = 8`)
	_, err := e.app.Exec(e.ctx, `ALTER TABLE t ALTER COLUMN id TYPE bigint`)
	require.ErrorContains(t, err, "trigger", "layout 1 pins the key's type")

	o := e.done(`SELECT mimeo.refresh_dml('public.t')`)
	require.Contains(t, strings.Join(e.jobSteps(*o.JobID), "\n"), "upgraded the source objects to layout 2")
	e.requireSame("public.t", "public.t")
	e.done(`SELECT mimeo.refresh_logdel('public.t_log')`)
	require.Equal(t, checksum(t, e.ctx, e.src, "public.t"), checksum(t, e.ctx, e.dst, logdelLive("public.t_log", "id, v, w")))
	var v7, w8 string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT (SELECT v::text FROM public.t_log WHERE id = 7 AND mimeo_source_deleted IS NOT NULL),
    (SELECT w FROM public.t_log WHERE id = 8 AND mimeo_source_deleted IS NOT NULL)`).Scan(&v7, &w8))
	require.Equal(t, []string{"7", "w8"}, []string{v7, w8}, "deleted rows queued before the upgrade keep their values")
	var index bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT to_regclass('public.t_log_mimeo_source_deleted') IS NOT NULL`).Scan(&index))
	require.True(t, index, "the upgrade indexes mimeo_source_deleted")
	var layouts []int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT ARRAY[(SELECT source_layout FROM mimeo.refresh_config_dml), (SELECT source_layout FROM mimeo.refresh_config_logdel)]`).Scan(&layouts))
	require.Equal(t, []int{2, 2}, layouts)

	e.exec(e.app, `ALTER TABLE t ALTER COLUMN id TYPE bigint`)
	e.exec(e.app, `TRUNCATE t`)
	e.exec(e.app, `INSERT INTO t VALUES (5000000000, 1, 'big')`)
	e.done(`SELECT mimeo.refresh_dml('public.t', p_repull => true)`)
	e.done(`SELECT mimeo.refresh_logdel('public.t_log', p_repull => true)`)
	e.requireSame("public.t", "public.t")
	require.Equal(t, checksum(t, e.ctx, e.src, "public.t"), checksum(t, e.ctx, e.dst, logdelLive("public.t_log", "id, v, w")))
	require.Equal(t, 3+38, len(e.markedIDs("public.t_log")), "the rows deleted before, and every row the TRUNCATE took")
}
