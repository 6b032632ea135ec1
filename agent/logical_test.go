package agent_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

// setupLogical is setup with the source reached as the logical role.
func setupLogical(t *testing.T) *env {
	t.Helper()
	e := setup(t)
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET username = $1, pwd = $2 WHERE data_source_id = $3`, logicalRole, logicalPass, e.dblink)
	return e
}

// sync calls refresh_logical as a script would and requires it to end done.
func (e *env) sync(table string) {
	e.t.Helper()
	e.done(`SELECT mimeo.refresh_logical($1)`, table)
}

// waitSame polls until the destination equals the source.
func (e *env) waitSame(srcTable, dstTable string) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for checksum(e.t, e.ctx, e.src, srcTable) != checksum(e.t, e.ctx, e.dst, dstTable) {
		if time.Now().After(deadline) {
			e.requireSame(srcTable, dstTable)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// slots lists the source's replication slots and publications.
func (e *env) slots() []string {
	e.t.Helper()
	rows, err := e.src.Query(e.ctx, `SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE NOT temporary AND database = current_database()
UNION ALL SELECT 'publication ' || pubname FROM pg_publication ORDER BY 1`)
	require.NoError(e.t, err)
	var out []string
	for rows.Next() {
		var s string
		require.NoError(e.t, rows.Scan(&s))
		out = append(out, s)
	}
	return out
}

func TestLogicalStreamsEveryChangeKind(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	tbl := `public."Order Lines"`
	e.exec(e.app, `CREATE TABLE `+tbl+` ("order" int, line int, qty numeric, note text, big text, PRIMARY KEY ("order", line))`)
	e.exec(e.app, `ALTER TABLE `+tbl+` ALTER COLUMN big SET STORAGE EXTERNAL`)
	e.exec(e.app, `INSERT INTO `+tbl+` SELECT g / 10, g % 10, g * 1.5, CASE WHEN g % 3 = 0 THEN NULL ELSE 'n' || g END,
        CASE WHEN g % 50 = 0 THEN repeat(md5(g::text), 200) END FROM generate_series(1, 500) g`)
	e.startAgent(e.config())
	o := e.done(`SELECT mimeo.logical_maker($1, $2)`, tbl, e.dblink)
	require.EqualValues(t, 500, *o.Rows)
	e.requireSame(tbl, tbl)

	for _, q := range []string{
		`INSERT INTO ` + tbl + ` VALUES (900, 1, 1, E'new\ttab', NULL), (900, 2, NULL, NULL, repeat('x', 9000))`,
		`UPDATE ` + tbl + ` SET qty = qty * 2 WHERE line = 3`,
		// The TOASTed values are not sent for these: they must stay.
		`UPDATE ` + tbl + ` SET note = 'toast kept' WHERE big IS NOT NULL`,
		`DELETE FROM ` + tbl + ` WHERE "order" = 7`,
		`UPDATE ` + tbl + ` SET "order" = 1000 WHERE "order" = 8`, // key change
		`UPDATE ` + tbl + ` SET "order" = 1001 WHERE "order" = 10`, // key change, TOAST unchanged
		`INSERT INTO ` + tbl + ` VALUES (901, 1, 1, 'gone', NULL)`,
		`DELETE FROM ` + tbl + ` WHERE "order" = 901`,
	} {
		e.exec(e.app, q)
	}
	e.sync(tbl) // a sync point: everything committed before it is there
	e.requireSame(tbl, tbl)
	var kept int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM `+tbl+` WHERE note = 'toast kept' AND length(big) = 6400`).Scan(&kept))
	require.Equal(t, 10, kept)

	// In one transaction: changes, TRUNCATE, more changes.
	e.exec(e.app, `BEGIN; UPDATE `+tbl+` SET qty = 0; TRUNCATE `+tbl+`; INSERT INTO `+tbl+` VALUES (1, 1, 1, 'after', NULL); COMMIT`)
	e.sync(tbl)
	e.requireSame(tbl, tbl)

	// Without a refresh call the stream keeps the copy fresh.
	e.exec(e.app, `INSERT INTO `+tbl+` SELECT 2000 + g, 1, g, 'live', NULL FROM generate_series(1, 100) g`)
	e.waitSame(tbl, tbl)

	var state, slot string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT logical_state, (SELECT slot_name FROM mimeo.logical_source) FROM mimeo.refresh_status WHERE dest_table = $1`, `public."Order Lines"`).Scan(&state, &slot))
	require.Equal(t, "ready", state)
	require.Contains(t, e.slots(), "slot "+slot)

	e.done(`SELECT mimeo.logical_destroyer($1)`, tbl)
	require.Empty(t, e.slots(), "the last table's destroyer drops the slot and the publication")
}

func TestLogicalSecondTableJoinsARunningStream(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.a (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `CREATE TABLE public.b (id bigint PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.a SELECT g, 'a' || g FROM generate_series(1, 1000) g`)
	e.exec(e.app, `INSERT INTO public.b SELECT g, 'b' || g FROM generate_series(1, 1000) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.a', $1)`, e.dblink)
	// Writes to both tables go on while b is made.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			_, _ = e.app.Exec(e.ctx, `UPDATE public.a SET v = v || '.' WHERE id = $1`, i%1000+1)
			_, _ = e.app.Exec(e.ctx, `UPDATE public.b SET v = v || '.' WHERE id = $1`, i%1000+1)
			_, _ = e.app.Exec(e.ctx, `INSERT INTO public.b VALUES ($1, 'new')`, 10000+i)
		}
	}()
	e.done(`SELECT mimeo.logical_maker('public.b', $1, p_dest_table => 'public.b_copy')`, e.dblink)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	<-done
	e.sync("public.a")
	e.sync("public.b_copy")
	e.requireSame("public.a", "public.a")
	e.requireSame("public.b", "public.b_copy")
	require.Len(t, e.slots(), 2, "one slot and one publication for the source")
}

func TestLogicalLogdelKeepsDeletedRows(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 100) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1, p_logdel => true)`, e.dblink)
	e.exec(e.app, `UPDATE public.t SET v = 'last' WHERE id <= 10`)
	e.exec(e.app, `DELETE FROM public.t WHERE id <= 5`)
	e.exec(e.app, `INSERT INTO public.t VALUES (1, 'back')`)
	e.sync("public.t")
	var live, dead int
	var v string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FILTER (WHERE mimeo_source_deleted IS NULL), count(*) FILTER (WHERE mimeo_source_deleted IS NOT NULL),
        (SELECT v FROM public.t WHERE id = 2) FROM public.t`).Scan(&live, &dead, &v))
	require.Equal(t, 96, live)
	require.Equal(t, 4, dead)
	require.Equal(t, "last", v, "a deleted row keeps its last values")
	require.Equal(t, checksum(t, e.ctx, e.src, "public.t"),
		checksum(t, e.ctx, e.dst, "(SELECT id, v FROM public.t WHERE mimeo_source_deleted IS NULL)"))
	e.exec(e.app, `TRUNCATE public.t`)
	e.sync("public.t")
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FILTER (WHERE mimeo_source_deleted IS NULL), count(*) FROM public.t`).Scan(&live, &dead))
	require.Equal(t, 0, live)
	require.Equal(t, 100, dead)
}

func TestLogicalMakerRefusesATableWithoutKey(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.nokey (a int, b text)`)
	e.startAgent(e.config())
	msg := e.failed(`SELECT mimeo.logical_maker('public.nokey', $1)`, e.dblink)
	require.Contains(t, msg, "no primary key or replica identity index")
	// The source's own writes keep working: it was never published.
	e.exec(e.app, `INSERT INTO public.nokey VALUES (1, 'x')`)
	e.exec(e.app, `UPDATE public.nokey SET b = 'y'`)
	e.exec(e.app, `DELETE FROM public.nokey`)
	require.NotContains(t, strings.Join(e.slots(), " "), "slot")
}

var _ = pgtest.Source
