package agent_test

import (
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// logdelLive is a logdel destination's live rows, to compare with the source.
func logdelLive(table, cols string) string {
	return `(SELECT ` + cols + ` FROM ` + table + ` WHERE mimeo_source_deleted IS NULL)`
}

// markedIDs lists the ids of a logdel destination's rows marked deleted.
func (e *env) markedIDs(table string) []int64 {
	e.t.Helper()
	return e.markedIDsOf(table, "id")
}

// markedIDsOf lists the key column of a logdel destination's rows marked
// deleted.
func (e *env) markedIDsOf(table, key string) []int64 {
	e.t.Helper()
	rows, err := e.dst.Query(e.ctx, `SELECT `+key+`::bigint FROM `+table+` WHERE mimeo_source_deleted IS NOT NULL ORDER BY 1`)
	require.NoError(e.t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(e.t, err)
	return ids
}

// TRUNCATE on the source reaches the destination in order with the other
// changes: dml empties it (then applies what came after), logdel keeps
// every row, marked deleted; several TRUNCATEs between refreshes, and one
// mixed with batches, come out right.
func TestTruncateReachesDMLAndLogdel(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 50) g`)
	e.prepareTriggers("public.t")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	e.done(`SELECT mimeo.logdel_maker('public.t', $1, 'public.t_log')`, e.dblink)

	e.exec(e.app, `UPDATE t SET v = -v WHERE id <= 5`)
	e.exec(e.app, `DELETE FROM t WHERE id = 6`) // logdel records its values
	e.exec(e.app, `TRUNCATE t`)
	e.exec(e.app, `INSERT INTO t VALUES (1, 100), (99, 99)`)
	e.done(`SELECT mimeo.refresh_dml('public.t')`)
	e.requireSame("public.t", "public.t")
	o := e.done(`SELECT mimeo.refresh_logdel('public.t_log')`)
	require.Contains(t, e.jobSteps(*o.JobID), "Apply TRUNCATE: marked deleted 44 rows the source no longer has, after a TRUNCATE")
	require.Equal(t, checksum(t, e.ctx, e.src, "public.t"), checksum(t, e.ctx, e.dst, logdelLive("public.t_log", "id, v")))
	require.Equal(t, 49, len(e.markedIDs("public.t_log")), "every truncated row kept, marked (1 came back)")
	var v6, v2 int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT v FROM public.t_log WHERE id = 6 AND mimeo_source_deleted IS NOT NULL`).Scan(&v6))
	require.Equal(t, 6, v6)
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT v FROM public.t_log WHERE id = 2 AND mimeo_source_deleted IS NOT NULL`).Scan(&v2))
	require.Equal(t, -2, v2, "a row updated before the TRUNCATE is kept with its last values")

	// Two TRUNCATEs and batches of 3 in one refresh.
	e.exec(e.app, `INSERT INTO t SELECT g, g FROM generate_series(200, 220) g`)
	e.exec(e.app, `TRUNCATE t`)
	e.exec(e.app, `INSERT INTO t SELECT g, g FROM generate_series(300, 310) g`)
	e.exec(e.app, `BEGIN; TRUNCATE t; INSERT INTO t VALUES (400, 1); COMMIT`)
	e.exec(e.app, `INSERT INTO t VALUES (401, 2)`)
	e.done(`SELECT mimeo.refresh_dml('public.t', p_limit => 3)`)
	e.requireSame("public.t", "public.t")
	e.done(`SELECT mimeo.refresh_logdel('public.t_log', p_limit => 3)`)
	require.Equal(t, checksum(t, e.ctx, e.src, "public.t"), checksum(t, e.ctx, e.dst, logdelLive("public.t_log", "id, v")))

	// An odd key name, with a % that format() must not take for its own.
	odd := `public."Odd %s; Table"`
	e.exec(e.app, `CREATE TABLE `+odd+` ("Key %s" int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO `+odd+` SELECT g, 'v' || g FROM generate_series(1, 5) g`)
	e.prepareTriggers(odd)
	e.done(`SELECT mimeo.logdel_maker($1, $2)`, odd, e.dblink)
	e.exec(e.app, `UPDATE `+odd+` SET v = 'last' WHERE "Key %s" = 1`)
	e.exec(e.app, `TRUNCATE `+odd)
	e.done(`SELECT mimeo.refresh_logdel($1)`, odd)
	var last string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT v FROM `+odd+` WHERE "Key %s" = 1 AND mimeo_source_deleted IS NOT NULL`).Scan(&last))
	require.Equal(t, "last", last)
	require.Len(t, e.markedIDsOf(odd, `"Key %s"`), 5)

	// Nothing left over: the next refresh finds nothing to do.
	e.done(`SELECT mimeo.refresh_dml('public.t')`)
	e.requireSame("public.t", "public.t")
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Zero(t, queued)
}

// A range-partitioned source keyed (id, created): an UPDATE that moves a
// row to another partition does not duplicate it; writes straight to a
// partition, a partition created later and written directly, and one
// detached all reach the destination. The replication role needs TRIGGER
// on every partition, and the maker says so.
func TestPartitionedSourceDMLAndLogdel(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, q := range []string{
		`CREATE TABLE public.pt (id int, created date, v text, PRIMARY KEY (id, created)) PARTITION BY RANGE (created)`,
		`CREATE TABLE public.pt_2024 PARTITION OF public.pt FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')`,
		`CREATE TABLE public.pt_2025 PARTITION OF public.pt FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')`,
		`INSERT INTO public.pt SELECT g, '2024-01-01'::date + g * 7, 'v' || g FROM generate_series(1, 80) g`,
	} {
		e.exec(e.app, q)
	}
	e.prepareTriggers("public.pt")
	e.startAgent(e.config())
	msg := e.failed(`SELECT mimeo.dml_maker('public.pt', $1)`, e.dblink)
	require.Contains(t, msg, "needs SELECT and TRIGGER on every table of the partition tree")
	require.Contains(t, msg, "GRANT SELECT, TRIGGER ON public.pt_2024, public.pt_2025 TO mimeo_repl")
	e.exec(e.app, `GRANT SELECT, TRIGGER ON public.pt_2024, public.pt_2025 TO `+replRole)
	e.done(`SELECT mimeo.dml_maker('public.pt', $1)`, e.dblink)
	e.done(`SELECT mimeo.logdel_maker('public.pt', $1, 'public.pt_log')`, e.dblink)
	live := logdelLive("public.pt_log", "id, created, v")

	e.exec(e.app, `UPDATE pt SET created = '2025-06-01' WHERE id IN (1, 2)`) // moves between partitions
	e.exec(e.app, `INSERT INTO pt_2024 VALUES (500, '2024-03-03', 'direct')`)
	e.exec(e.app, `DELETE FROM pt_2025 WHERE id = 60`)
	e.exec(e.app, `UPDATE pt_2024 SET v = 'direct update' WHERE id = 3`)
	e.done(`SELECT mimeo.refresh_dml('public.pt')`)
	e.requireSame("public.pt", "public.pt")
	e.done(`SELECT mimeo.refresh_logdel('public.pt_log')`)
	require.Equal(t, checksum(t, e.ctx, e.src, "public.pt"), checksum(t, e.ctx, e.dst, live))
	require.Equal(t, 3, len(e.markedIDs("public.pt_log")), "the two moved rows' old keys and the deleted row")

	// A partition made later and written directly before the next refresh;
	// a table loaded first and then attached.
	e.exec(e.app, `CREATE TABLE public.pt_2026 PARTITION OF public.pt FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')`)
	e.exec(e.app, `INSERT INTO pt_2026 VALUES (700, '2026-02-02', 'new partition')`)
	e.exec(e.app, `CREATE TABLE public.pt_2027 (LIKE public.pt)`)
	e.exec(e.app, `INSERT INTO public.pt_2027 VALUES (800, '2027-05-05', 'attached')`)
	e.exec(e.app, `ALTER TABLE public.pt ATTACH PARTITION public.pt_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.pt')`), "GRANT SELECT, TRIGGER ON public.pt_2026, public.pt_2027 TO mimeo_repl")
	e.exec(e.app, `GRANT SELECT, TRIGGER ON public.pt_2026, public.pt_2027 TO `+replRole)
	o := e.done(`SELECT mimeo.refresh_dml('public.pt')`)
	require.Contains(t, e.jobSteps(*o.JobID), "Update source objects: put the triggers on public.pt_2026, public.pt_2027 (new in the partition tree) and queued the keys of its rows")
	e.requireSame("public.pt", "public.pt")
	e.exec(e.app, `INSERT INTO pt_2026 VALUES (701, '2026-03-03', 'now with triggers')`)
	e.done(`SELECT mimeo.refresh_dml('public.pt')`)
	e.requireSame("public.pt", "public.pt")

	// A partition detached (as retention does): its rows leave the source.
	e.exec(e.app, `ALTER TABLE public.pt DETACH PARTITION public.pt_2024`)
	e.done(`SELECT mimeo.refresh_dml('public.pt')`)
	e.requireSame("public.pt", "public.pt")
	e.done(`SELECT mimeo.refresh_logdel('public.pt_log')`)
	require.Equal(t, checksum(t, e.ctx, e.src, "public.pt"), checksum(t, e.ctx, e.dst, live))
	var kept int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM public.pt_log WHERE created < '2025-01-01' AND mimeo_source_deleted IS NULL`).Scan(&kept))
	require.Zero(t, kept, "the detached partition's rows are marked deleted")
	// Writes to the detached table are no business of the copy's.
	e.exec(e.app, `INSERT INTO public.pt_2024 VALUES (900, '2024-09-09', 'detached')`)
	e.done(`SELECT mimeo.refresh_dml('public.pt')`)
	e.requireSame("public.pt", "public.pt")

	// TRUNCATE of one partition.
	e.exec(e.app, `TRUNCATE public.pt_2025`)
	e.done(`SELECT mimeo.refresh_dml('public.pt')`)
	e.requireSame("public.pt", "public.pt")

	e.done(`SELECT mimeo.dml_destroyer('public.pt')`)
	e.done(`SELECT mimeo.logdel_destroyer('public.pt_log')`)
	var triggers int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'mimeo%'
    AND tgrelid <> 'public.pt_2024'::regclass`).Scan(&triggers))
	require.Zero(t, triggers, "the destroyers remove the triggers from every partition")
}

// A condition is written against the source table's own columns, key
// columns included, as for every other type.
func TestConditionOnAKeyColumn(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.kc (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.kc SELECT g, g FROM generate_series(1, 100) g`)
	e.prepareTriggers("public.kc")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.kc', $1, p_condition => 'id < 50')`, e.dblink)
	e.done(`SELECT mimeo.logdel_maker('public.kc', $1, 'public.kc_log', p_condition => 'WHERE kc.id < 50 AND v IS NOT NULL')`, e.dblink)
	e.exec(e.app, `UPDATE kc SET v = -v WHERE id IN (10, 60)`)
	e.exec(e.app, `DELETE FROM kc WHERE id IN (11, 61)`)
	e.exec(e.app, `INSERT INTO kc VALUES (0, 0), (200, 200)`)
	e.done(`SELECT mimeo.refresh_dml('public.kc')`)
	e.done(`SELECT mimeo.refresh_logdel('public.kc_log')`)
	want := `(SELECT id, v FROM public.kc WHERE id < 50)`
	require.Equal(t, checksum(t, e.ctx, e.src, want), checksum(t, e.ctx, e.dst, "public.kc"))
	require.Equal(t, checksum(t, e.ctx, e.src, want), checksum(t, e.ctx, e.dst, logdelLive("public.kc_log", "id, v")))
	require.Equal(t, 1, len(e.markedIDs("public.kc_log")))
}
