package agent_test

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestTableTypeReloadsAPlainTable(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 1000)
	e.startAgent(e.config())

	o := e.done(`SELECT mimeo.table_maker('public.items', $1, 'public.items_dev', p_condition => 'id <= 600', p_filter => ARRAY['id', 't'])`, e.dblink)
	require.EqualValues(t, 600, *o.Rows)
	require.Equal(t, checksum(t, e.ctx, e.src, "(SELECT id, t FROM public.items WHERE id <= 600)"),
		checksum(t, e.ctx, e.dst, "public.items_dev"))

	e.exec(e.app, `UPDATE items SET t = 'x' WHERE id < 10`)
	o = e.done(`SELECT mimeo.refresh_table('public.items_dev')`)
	require.EqualValues(t, 600, *o.Rows)
	require.Equal(t, checksum(t, e.ctx, e.src, "(SELECT id, t FROM public.items WHERE id <= 600)"),
		checksum(t, e.ctx, e.dst, "public.items_dev"))

	e.exec(e.app, `ALTER TABLE items ALTER COLUMN t TYPE varchar(100)`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_table('public.items_dev')`), "source columns changed")
	require.Equal(t, 600, e.count("public.items_dev"), "a failed reload leaves the old rows")

	e.done(`SELECT mimeo.table_destroyer('public.items_dev', 'ARCHIVE')`)
	require.Equal(t, 600, e.count("public.items_dev"), "archive keeps the table")
	require.Contains(t, e.sqlError(`SELECT mimeo.table_maker('public.items', $1, 'public.items_dev2', p_sequences => ARRAY['dev_seq'])`, e.dblink), "must be schema-qualified")
	// A sequence the destination lacks is refused at once, queueing nothing.
	require.Contains(t, e.sqlError(`SELECT mimeo.table_maker('public.items', $1, 'public.items_dev2', p_sequences => ARRAY['public.dev_seq'])`, e.dblink),
		"p_sequences names public.dev_seq, which is not a sequence of this destination database")
	e.exec(e.dst, `CREATE SEQUENCE public.dev_seq`)
	e.done(`SELECT mimeo.table_maker('public.items', $1, 'public.items_dev2', p_sequences => ARRAY['public.dev_seq'])`, e.dblink)
	// The DBA gives the dev copy a sequence default; refreshes keep the
	// sequence past the rows loaded.
	e.exec(e.dst, `ALTER TABLE public.items_dev2 ALTER COLUMN id SET DEFAULT nextval('public.dev_seq')`)
	e.done(`SELECT mimeo.refresh_table('public.items_dev2')`)
	var next int64
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT nextval('public.dev_seq')`).Scan(&next))
	require.EqualValues(t, 1001, next)
	e.done(`SELECT mimeo.table_destroyer('public.items_dev2')`)
	var exists bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT to_regclass('public.items_dev2') IS NOT NULL`).Scan(&exists))
	require.False(t, exists)
}

func (e *env) count(table string) int {
	e.t.Helper()
	var n int
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM `+table).Scan(&n))
	return n
}
