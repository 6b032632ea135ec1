package agent_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

// A column dropped, renamed, retyped or added on the source of a dml,
// logdel, inserter or updater table is noticed at the next run: it fails,
// naming the column and the call that rebuilds; p_repull => true rebuilds
// the destination with the source's columns, keeping its grants and
// indexes and running post_script; replication goes on after. The source's
// own writes never fail meanwhile.
func TestSourceColumnChangesAreNoticedAndRebuilt(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.c (id int PRIMARY KEY, a int, b text, c int,
    ts timestamptz NOT NULL DEFAULT '2024-01-01', n bigint GENERATED ALWAYS AS IDENTITY)`)
	e.exec(e.app, `CREATE INDEX c_b ON public.c (b)`)
	e.exec(e.app, `INSERT INTO public.c (id, a, b, c) SELECT g, g, 'b' || g, g FROM generate_series(1, 30) g`)
	e.prepareTriggers("public.c")
	e.startAgent(e.config())
	post := `ARRAY['COMMENT ON TABLE %s IS ''rebuilt by mimeo''']`
	makers := map[string]string{
		"dml":      `SELECT mimeo.dml_maker('public.c', $1, 'public.c_dml', p_post_script => ` + fmt.Sprintf(post, "public.c_dml") + `)`,
		"logdel":   `SELECT mimeo.logdel_maker('public.c', $1, 'public.c_logdel', p_post_script => ` + fmt.Sprintf(post, "public.c_logdel") + `)`,
		"inserter": `SELECT mimeo.inserter_maker('public.c', 'n', $1, p_boundary => '0', p_dest_table => 'public.c_inserter', p_post_script => ` + fmt.Sprintf(post, "public.c_inserter") + `)`,
		"updater":  `SELECT mimeo.updater_maker('public.c', 'ts', $1, p_boundary => '0 s', p_dest_table => 'public.c_updater', p_post_script => ` + fmt.Sprintf(post, "public.c_updater") + `)`,
	}
	for typ, maker := range makers {
		e.done(maker, e.dblink)
		dest := "public.c_" + typ
		e.exec(e.dst, `GRANT SELECT ON `+dest+` TO reader`)
		e.exec(e.dst, `CREATE INDEX ON `+dest+` (a)`) // the DBA's own index
		var comment *string
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT obj_description($1::regclass)`, dest).Scan(&comment))
		require.NotNil(t, comment, "%s: post_script runs when the maker creates the table", typ)
		e.exec(e.dst, `COMMENT ON TABLE `+dest+` IS NULL`)
	}

	e.exec(e.app, `ALTER TABLE public.c DROP COLUMN c`)
	e.exec(e.app, `ALTER TABLE public.c RENAME COLUMN b TO bb`)
	e.exec(e.app, `ALTER TABLE public.c ALTER COLUMN a TYPE bigint`)
	e.exec(e.app, `ALTER TABLE public.c ADD COLUMN d text DEFAULT 'new'`)
	// The application goes on writing, deletes included.
	e.exec(e.app, `INSERT INTO public.c (id, a, bb) VALUES (100, 5000000000, 'big')`)
	e.exec(e.app, `UPDATE public.c SET ts = '2025-01-01', a = a + 1 WHERE id <= 3`)
	e.exec(e.app, `DELETE FROM public.c WHERE id = 30`)

	for typ := range makers {
		dest := "public.c_" + typ
		msg := e.failed(fmt.Sprintf(`SELECT mimeo.refresh_%s('%s')`, typ, dest))
		require.Contains(t, msg, `column "c" was dropped or renamed`, typ)
		require.Contains(t, msg, `column "b" was dropped or renamed`, typ)
		require.Contains(t, msg, `column "bb" (text) was added`, typ)
		require.Contains(t, msg, `column "d" (text) was added`, typ)
		require.Contains(t, msg, `column "a" changed type from integer to bigint`, typ)
		require.Contains(t, msg, fmt.Sprintf(`SELECT mimeo.refresh_%s('%s', p_repull => true)`, typ, dest), typ)

		e.done(fmt.Sprintf(`SELECT mimeo.refresh_%s('%s', p_repull => true)`, typ, dest))
		var grant bool
		var comment *string
		var indexes int
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT has_table_privilege('reader', $1, 'SELECT'), obj_description($1::regclass),
    (SELECT count(*) FROM pg_index WHERE indrelid = $1::regclass)`, dest).Scan(&grant, &comment, &indexes))
		require.True(t, grant, "%s keeps its grants", typ)
		require.NotNil(t, comment, "%s: post_script ran", typ)
		require.Equal(t, "rebuilt by mimeo", *comment)
		require.GreaterOrEqual(t, indexes, 2, "%s keeps its key and the DBA's index", typ)
	}
	cols := "id, a, bb, ts, n, d"
	e.requireSame("(SELECT "+cols+" FROM public.c)", "(SELECT "+cols+" FROM public.c_dml)")
	e.requireSame("(SELECT "+cols+" FROM public.c)", "(SELECT "+cols+" FROM public.c_updater)")
	e.requireSame("(SELECT "+cols+" FROM public.c)", logdelLive("public.c_logdel", cols))
	e.requireSame("(SELECT "+cols+" FROM public.c)", "(SELECT "+cols+" FROM public.c_inserter)")

	// Replication goes on with the new columns.
	e.exec(e.app, `INSERT INTO public.c (id, a, bb, ts) VALUES (101, 6000000000, 'after', '2026-01-01')`)
	e.exec(e.app, `UPDATE public.c SET d = 'changed', ts = '2026-01-02' WHERE id = 1`)
	for typ := range makers {
		e.done(fmt.Sprintf(`SELECT mimeo.refresh_%s('public.c_%s')`, typ, typ))
	}
	e.requireSame("(SELECT "+cols+" FROM public.c)", "(SELECT "+cols+" FROM public.c_dml)")
	e.requireSame("(SELECT "+cols+" FROM public.c)", "(SELECT "+cols+" FROM public.c_updater)")
	e.requireSame("(SELECT "+cols+" FROM public.c)", logdelLive("public.c_logdel", cols))
}

// A key column's type may change on a dml/logdel source (integer to
// bigint), as the original mimeo allowed: the source's writes keep working,
// also with keys past the old type's range, and a repull follows it.
func TestKeyColumnRetypeOnTheSource(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.k (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.k SELECT g, 'v' || g FROM generate_series(1, 20) g`)
	e.prepareTriggers("public.k")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.k', $1)`, e.dblink)
	e.done(`SELECT mimeo.logdel_maker('public.k', $1, 'public.k_log')`, e.dblink)
	var index bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = 'public.k_log'::regclass AND a.attname = 'mimeo_source_deleted')`).Scan(&index))
	require.True(t, index, "logdel indexes mimeo_source_deleted")

	e.exec(e.app, `ALTER TABLE public.k ALTER COLUMN id TYPE bigint`)
	e.exec(e.app, `INSERT INTO public.k VALUES (3000000000, 'past int')`)
	e.exec(e.app, `UPDATE public.k SET id = 3000000001 WHERE id = 1`)
	e.exec(e.app, `DELETE FROM public.k WHERE id = 2`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.k')`), `column "id" changed type from integer to bigint`)
	e.done(`SELECT mimeo.refresh_dml('public.k', p_repull => true)`)
	e.done(`SELECT mimeo.refresh_logdel('public.k_log', p_repull => true)`)
	e.exec(e.app, `INSERT INTO public.k VALUES (4000000000, 'later')`)
	e.exec(e.app, `DELETE FROM public.k WHERE id = 3000000000`)
	e.done(`SELECT mimeo.refresh_dml('public.k')`)
	e.done(`SELECT mimeo.refresh_logdel('public.k_log')`)
	e.requireSame("public.k", "public.k")
	require.Equal(t, checksum(t, e.ctx, e.src, "public.k"), checksum(t, e.ctx, e.dst, logdelLive("public.k_log", "id, v")))
	require.Equal(t, []int64{1, 2, 3000000000}, e.markedIDs("public.k_log"))
}

// A key retyped beyond its kind (integer to text) makes the source's writes
// fail until the queue follows: the next refresh retypes the queue (and
// fails, asking for the repull), after which the writes work again.
func TestKeyRetypedToAnotherKind(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.kt (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.kt SELECT g, 'v' || g FROM generate_series(1, 5) g`)
	e.prepareTriggers("public.kt")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.kt', $1)`, e.dblink)
	e.exec(e.app, `ALTER TABLE public.kt ALTER COLUMN id TYPE text`)
	_, err := e.app.Exec(e.ctx, `INSERT INTO public.kt VALUES ('abc', 'x')`)
	require.ErrorContains(t, err, "is of type bigint", "the queue still holds integer keys")
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.kt')`), `column "id" changed type from integer to text`)
	e.exec(e.app, `INSERT INTO public.kt VALUES ('abc', 'x')`)
	e.done(`SELECT mimeo.refresh_dml('public.kt', p_repull => true)`)
	e.exec(e.app, `UPDATE public.kt SET v = 'y' WHERE id = 'abc'`)
	e.done(`SELECT mimeo.refresh_dml('public.kt')`)
	e.requireSame("public.kt", "public.kt")
}
