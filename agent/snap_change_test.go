package agent_test

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func (e *env) viewColumns(view string) string {
	e.t.Helper()
	var cols string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `
SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped`, view).Scan(&cols))
	return cols
}

// Every kind of source column change rebuilds the tables and the view,
// keeps the view's grants, re-creates the indexes and runs post_script.
func TestSnapSourceColumnChanges(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 200)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	e.exec(e.dst, `GRANT SELECT ON public.items TO reader`)
	e.exec(e.dst, `CREATE TABLE public.post_log (n serial, cols text)`)
	e.exec(e.dst, `UPDATE mimeo.refresh_config_snap SET post_script = ARRAY[
        $$INSERT INTO public.post_log (cols) SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attnum > 0$$]`)

	changes := []struct {
		ddl  string
		cols string
	}{
		{`ALTER TABLE items ADD COLUMN extra text DEFAULT 'new'`,
			"id bigint, n integer, t text, x numeric(12,3), ts timestamp with time zone, extra text"},
		{`ALTER TABLE items DROP COLUMN n`,
			"id bigint, t text, x numeric(12,3), ts timestamp with time zone, extra text"},
		{`ALTER TABLE items RENAME COLUMN t TO label`,
			"id bigint, label text, x numeric(12,3), ts timestamp with time zone, extra text"},
		{`ALTER TABLE items ALTER COLUMN x TYPE double precision`,
			"id bigint, label text, x double precision, ts timestamp with time zone, extra text"},
	}
	for i, c := range changes {
		// A DDL alone does not move the write counters: column changes
		// must be noticed anyway.
		e.exec(e.app, c.ddl)
		e.done(`SELECT mimeo.refresh_snap('public.items')`)
		require.Equal(t, c.cols, e.viewColumns("public.items"), c.ddl)
		e.requireSame("public.items", "public.items")
		var canRead bool
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT has_table_privilege('reader', 'public.items', 'SELECT')`).Scan(&canRead))
		require.True(t, canRead, "grant kept after %s", c.ddl)
		var runs int
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM public.post_log`).Scan(&runs))
		require.Equal(t, i+1, runs, "post_script ran after %s", c.ddl)
		var pk bool
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1::regclass AND indisprimary)`,
			e.viewReads("public.items")).Scan(&pk))
		require.True(t, pk, "primary key re-created after %s", c.ddl)
	}
	// Unchanged columns and counters after all that: skipped.
	o := e.done(`SELECT mimeo.refresh_snap('public.items')`)
	require.Contains(t, *o.Message, "skipped copy")
}

func TestSnapOddNames(t *testing.T) {
	t.Parallel()
	e := setup(t)
	long := "a_name_that_is_exactly_sixty-three_bytes_long_ok_1234567890abcd"
	require.Len(t, long, 63)
	for _, q := range []string{
		`CREATE SCHEMA "My Schema"`,
		`CREATE TABLE "My Schema"."Weird Name; DROP TABLE x" ("Id" int PRIMARY KEY, "we""ird col" text, "select" int)`,
		`INSERT INTO "My Schema"."Weird Name; DROP TABLE x" VALUES (1, 'a', 1), (2, NULL, NULL), (3, '"quoted"', 3)`,
		`CREATE TABLE public."` + long + `" (id int PRIMARY KEY, v text)`,
		`INSERT INTO public."` + long + `" SELECT g, g::text FROM generate_series(1, 50) g`,
		`GRANT USAGE ON SCHEMA "My Schema" TO ` + replRole,
		`GRANT SELECT ON ALL TABLES IN SCHEMA "My Schema", public TO ` + replRole,
	} {
		e.exec(e.app, q)
	}
	e.exec(e.dst, `CREATE SCHEMA "My Schema"`)
	e.startAgent(e.config())

	weird := `"My Schema"."Weird Name; DROP TABLE x"`
	e.done(`SELECT mimeo.snapshot_maker($1, $2)`, weird, e.dblink)
	e.requireSame(weird, weird)
	e.writeAndWaitStats(weird, `UPDATE "My Schema"."Weird Name; DROP TABLE x" SET "select" = 9`)
	e.done(`SELECT mimeo.refresh_snap($1)`, weird)
	e.requireSame(weird, weird)

	longName := `public."` + long + `"`
	e.done(`SELECT mimeo.snapshot_maker($1, $2)`, longName, e.dblink)
	e.requireSame(longName, longName)
	var names []string
	rows, err := e.dst.Query(e.ctx, `SELECT relname FROM pg_class WHERE relname LIKE 'a_name_that%' ORDER BY relname`)
	require.NoError(t, err)
	for rows.Next() {
		var n string
		require.NoError(t, rows.Scan(&n))
		require.LessOrEqual(t, len(n), 63)
		names = append(names, n)
	}
	require.NoError(t, rows.Err())
	require.Len(t, names, 4, "view, two tables and the primary key, all distinct: %v", names)

	e.done(`SELECT mimeo.snapshot_destroyer($1)`, weird)
	e.done(`SELECT mimeo.snapshot_destroyer($1)`, longName)
}

// Partitioned tables and views as sources: they keep no write counters,
// so every refresh copies.
func TestSnapFromPartitionedTableAndView(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, q := range []string{
		`CREATE TABLE public.parted (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)`,
		`CREATE TABLE public.parted_eu PARTITION OF public.parted FOR VALUES IN ('eu')`,
		`CREATE TABLE public.parted_us PARTITION OF public.parted FOR VALUES IN ('us')`,
		`INSERT INTO public.parted SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END FROM generate_series(1, 100) g`,
		`CREATE VIEW public.eu AS SELECT id FROM public.parted WHERE region = 'eu'`,
		`GRANT SELECT ON public.parted, public.eu TO ` + replRole,
	} {
		e.exec(e.app, q)
	}
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.parted', $1)`, e.dblink)
	e.done(`SELECT mimeo.snapshot_maker('public.eu', $1)`, e.dblink)
	e.exec(e.app, `INSERT INTO public.parted VALUES (1000, 'eu')`)
	o := e.done(`SELECT mimeo.refresh_snap('public.parted')`)
	require.EqualValues(t, 101, *o.Rows)
	o = e.done(`SELECT mimeo.refresh_snap('public.eu')`)
	require.EqualValues(t, 51, *o.Rows)
	e.requireSame("public.parted", "public.parted")
	e.requireSame("public.eu", "public.eu")
}
