package agent_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// createItems makes a source table with awkward values (NULLs, unicode,
// numerics, timestamps) and grants the replication role SELECT on it.
func (e *env) createItems(table string, rows int) {
	e.t.Helper()
	e.exec(e.app, `CREATE TABLE `+table+` (
    id bigint PRIMARY KEY,
    n int,
    t text,
    x numeric(12,3),
    ts timestamptz DEFAULT now())`)
	e.exec(e.app, `CREATE INDEX ON `+table+` (ts)`)
	e.exec(e.app, `INSERT INTO `+table+`
SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE g % 100 END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'ünïcode ' || md5(g::text) END,
       g / 3.0, '2024-01-01'::timestamptz + g * interval '1 minute'
FROM generate_series(1, $1) g`, rows)
	e.exec(e.app, `GRANT SELECT ON `+table+` TO `+replRole)
}

func (e *env) viewReads(view string) string {
	e.t.Helper()
	var rel string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `
SELECT d.refobjid::regclass::text FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refobjid <> r.ev_class
JOIN pg_class c ON c.oid = d.refobjid AND c.relkind = 'r'
WHERE r.ev_class = $1::regclass LIMIT 1`, view).Scan(&rel))
	return rel
}

func TestSnapMakerRefreshDestroyer(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 5000)
	e.startAgent(e.config())

	o := e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	require.EqualValues(t, 5000, *o.Rows)
	e.requireSame("public.items", "public.items")
	require.Equal(t, "items_snap1", e.viewReads("public.items"))
	var indexes int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM pg_indexes WHERE tablename = 'items_snap1'`).Scan(&indexes))
	require.Equal(t, 2, indexes, "primary key and ts index re-created")

	e.writeAndWaitStats("public.items",
		`UPDATE items SET t = 'changed' WHERE id % 10 = 1`,
		`DELETE FROM items WHERE id % 10 = 2`,
		`INSERT INTO items (id, n, t, x) VALUES (100001, 1, E'tab\tnewline\n\\', 1.5)`)
	o = e.done(`SELECT mimeo.refresh_snap('public.items')`)
	require.EqualValues(t, 4501, *o.Rows)
	e.requireSame("public.items", "public.items")
	require.Equal(t, "items_snap2", e.viewReads("public.items"))

	// Nothing changed on the source: the copy is skipped, and says so.
	o = e.done(`SELECT mimeo.refresh_snap('public.items')`)
	require.EqualValues(t, 0, *o.Rows)
	require.Contains(t, *o.Message, "statistics unchanged")
	require.Contains(t, strings.Join(e.jobSteps(*o.JobID), "\n"), "skipped copy")
	require.Equal(t, "items_snap2", e.viewReads("public.items"))

	// TRUNCATE leaves the write counters alone, but not the file node.
	e.exec(e.app, `TRUNCATE items`)
	o = e.done(`SELECT mimeo.refresh_snap('public.items')`)
	require.NotContains(t, *o.Message, "skipped")
	e.requireSame("public.items", "public.items")
	require.Zero(t, e.count("public.items"))
	e.exec(e.app, `INSERT INTO items (id) VALUES (1), (2), (3)`)
	e.writeAndWaitStats("public.items", `INSERT INTO items (id) VALUES (4)`)
	e.done(`SELECT mimeo.refresh_snap('public.items')`)
	// A changed condition is a change too.
	e.exec(e.dst, `UPDATE mimeo.refresh_config_snap SET condition = 'id > 2'`)
	o = e.done(`SELECT mimeo.refresh_snap('public.items')`)
	require.EqualValues(t, 2, *o.Rows)
	e.exec(e.dst, `UPDATE mimeo.refresh_config_snap SET condition = NULL`)
	e.done(`SELECT mimeo.refresh_snap('public.items')`)
	e.requireSame("public.items", "public.items")

	// The SQL wait returns the outcome of a finished request.
	var status string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT status FROM mimeo.wait($1)`, e.request(`SELECT mimeo.refresh_snap('public.items')`)).Scan(&status))
	require.Equal(t, "done", status)

	var jobs int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.job_log WHERE dest_table = 'public.items' AND status = 'OK'`).Scan(&jobs))
	require.Equal(t, 8, jobs)

	e.done(`SELECT mimeo.snapshot_destroyer('public.items')`)
	var left int
	require.NoError(t, e.dst.QueryRow(e.ctx, `
SELECT (SELECT count(*) FROM pg_class WHERE relname IN ('items', 'items_snap1', 'items_snap2'))
     + (SELECT count(*) FROM mimeo.refresh_config)`).Scan(&left))
	require.Zero(t, left, "destroyer leaves no view, table or config")
}

func TestSnapDestroyerArchiveKeepsDataAndGrants(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 300)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	e.exec(e.dst, `GRANT SELECT ON public.items TO reader`)

	e.done(`SELECT mimeo.snapshot_destroyer('public.items', 'ARCHIVE')`)
	var kind string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT relkind::text FROM pg_class WHERE oid = 'public.items'::regclass`).Scan(&kind))
	require.Equal(t, "r", kind, "archive leaves a plain table")
	e.requireSame("public.items", "public.items")
	var canRead bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT has_table_privilege('reader', 'public.items', 'SELECT')`).Scan(&canRead))
	require.True(t, canRead, "grants survive archiving")
	var snaps int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM pg_class WHERE relname LIKE 'items_snap%' AND relkind = 'r'`).Scan(&snaps))
	require.Zero(t, snaps)
}
