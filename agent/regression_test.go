package agent_test

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// Two makers for one destination, queued before the agent saw either: the
// second must fail without touching the first one's source objects.
func TestSecondDMLMakerLeavesTheFirstAlone(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 20) g`)
	e.prepareTriggers("public.t")
	var first, second int64
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT mimeo.dml_maker('public.t', $1), mimeo.dml_maker('public.t', $1)`, e.dblink).Scan(&first, &second))
	one := e.config()
	one.Workers = 1 // the second runs after the first has finished
	e.startAgent(one)
	require.Equal(t, "done", e.await(first).Status)
	o := e.await(second)
	require.Equal(t, "failed", o.Status)
	require.Contains(t, *o.Error, "already exists")
	e.exec(e.app, `UPDATE t SET v = 0`)
	e.done(`SELECT mimeo.refresh_dml('public.t')`)
	e.requireSame("public.t", "public.t")
}

// A range repull never reaches past last_value: those rows are the next
// catch-up's, and taking them twice would double them.
func TestRangeRepullStopsAtLastValue(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.ev (id bigint PRIMARY KEY)`)
	e.exec(e.app, `INSERT INTO public.ev SELECT generate_series(1, 10)`)
	e.exec(e.app, `GRANT SELECT ON public.ev TO `+replRole)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.inserter_maker('public.ev', 'id', $1, p_boundary => '0')`, e.dblink)
	e.exec(e.app, `INSERT INTO public.ev SELECT generate_series(11, 20)`)
	e.done(`SELECT mimeo.refresh_inserter('public.ev', p_repull => true, p_repull_start => '5', p_repull_end => '100')`)
	require.Equal(t, 10, e.count("public.ev"), "rows past last_value wait for the catch-up")
	e.done(`SELECT mimeo.refresh_inserter('public.ev')`)
	e.requireSame("public.ev", "public.ev")
}

// logdel: a key change marks the old key deleted; a row leaving the
// condition leaves the destination; a repull keeps queued deletions; a
// key changed by a BEFORE trigger is caught.
func TestLogdelKeyChangesConditionAndRepull(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.p (id int PRIMARY KEY, region text NOT NULL, v int)`)
	e.exec(e.app, `INSERT INTO public.p SELECT g, CASE WHEN g % 2 = 0 THEN 'EU' ELSE 'US' END, g FROM generate_series(1, 40) g`)
	e.exec(e.app, `CREATE FUNCTION public.bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.v = -1 THEN NEW.id := NEW.id + 1000; END IF; RETURN NEW; END $$`)
	e.exec(e.app, `CREATE TRIGGER bump BEFORE UPDATE ON public.p FOR EACH ROW EXECUTE FUNCTION public.bump()`)
	e.prepareTriggers("public.p")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logdel_maker('public.p', $1, p_condition => $$region = 'EU'$$)`, e.dblink)
	live := `(SELECT id, region, v FROM public.p WHERE mimeo_source_deleted IS NULL)`
	want := `(SELECT id, region, v FROM public.p WHERE region = 'EU')`
	require.Equal(t, checksum(t, e.ctx, e.src, want), checksum(t, e.ctx, e.dst, live))

	e.exec(e.app, `UPDATE p SET id = 500 WHERE id = 2`)      // key change
	e.exec(e.app, `UPDATE p SET v = -1 WHERE id = 4`)        // key changed by the BEFORE trigger
	e.exec(e.app, `UPDATE p SET region = 'US' WHERE id = 6`) // leaves the condition
	e.exec(e.app, `DELETE FROM p WHERE id IN (8, 9)`)        // 9 never matched the condition
	e.done(`SELECT mimeo.refresh_logdel('public.p')`)
	require.Equal(t, checksum(t, e.ctx, e.src, want), checksum(t, e.ctx, e.dst, live))
	marked := e.markedIDs("public.p")
	require.Equal(t, []int64{2, 4, 8}, marked, "old keys and deleted rows are kept, marked; rows that never matched are not")

	e.exec(e.app, `DELETE FROM p WHERE id = 10`)
	e.done(`SELECT mimeo.refresh_logdel('public.p', p_repull => true)`)
	require.Equal(t, checksum(t, e.ctx, e.src, want), checksum(t, e.ctx, e.dst, live))
	var kept bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT EXISTS (SELECT 1 FROM public.p WHERE id = 10 AND mimeo_source_deleted IS NOT NULL)`).Scan(&kept))
	require.True(t, kept, "a deletion still queued at the repull is kept as history")
}

// A nullable unique column is no key; a renamed key column fails the run
// (it used to crash the agent).
func TestKeysMustBeNotNullAndStay(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.u (code text UNIQUE, at timestamptz NOT NULL)`)
	e.exec(e.app, `CREATE TABLE public.k (id int PRIMARY KEY, v int)`)
	e.prepareTriggers("public.u", "public.k")
	e.startAgent(e.config())
	require.Contains(t, e.failed(`SELECT mimeo.updater_maker('public.u', 'at', $1)`, e.dblink), "no primary key or unique index")
	e.done(`SELECT mimeo.dml_maker('public.k', $1)`, e.dblink)
	e.exec(e.app, `INSERT INTO k VALUES (1, 1)`)
	e.exec(e.app, `ALTER TABLE k RENAME COLUMN id TO ident`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.k')`), `key column "id" is no longer a column`)
	e.exec(e.app, `ALTER TABLE k RENAME COLUMN ident TO id`)
	e.done(`SELECT mimeo.refresh_dml('public.k')`)
	e.requireSame("public.k", "public.k")
}

// Odd names everywhere: schema, table, control and key columns.
func TestIncrementalAndDMLOddNames(t *testing.T) {
	t.Parallel()
	e := setup(t)
	tbl := `"My Schema"."Events; DROP TABLE x"`
	for _, q := range []string{
		`CREATE SCHEMA "My Schema"`,
		`CREATE TABLE ` + tbl + ` ("Event ID" bigint PRIMARY KEY, "Created At" timestamptz NOT NULL, "select" text)`,
		`INSERT INTO ` + tbl + ` SELECT g, '2024-01-01 00:00+00'::timestamptz + g * interval '1 second', 'it''s ' || g FROM generate_series(1, 50) g`,
		`GRANT USAGE ON SCHEMA "My Schema" TO ` + replRole,
	} {
		e.exec(e.app, q)
	}
	e.prepareTriggers(tbl)
	e.exec(e.dst, `CREATE SCHEMA "My Schema"`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.updater_maker($1, 'Created At', $2, p_boundary => '0', p_dest_table => '"My Schema"."Upd"')`, tbl, e.dblink)
	e.done(`SELECT mimeo.dml_maker($1, $2, '"My Schema"."Dml"')`, tbl, e.dblink)
	e.exec(e.app, `UPDATE `+tbl+` SET "select" = 'changed', "Created At" = '2025-01-01 00:00+00' WHERE "Event ID" <= 5`)
	e.exec(e.app, `DELETE FROM `+tbl+` WHERE "Event ID" = 50`)
	e.done(`SELECT mimeo.refresh_updater('"My Schema"."Upd"')`)
	e.done(`SELECT mimeo.refresh_dml('"My Schema"."Dml"')`)
	e.requireSame(tbl, `"My Schema"."Dml"`)
	require.Equal(t, checksum(t, e.ctx, e.src, `(SELECT * FROM `+tbl+` UNION ALL SELECT 50, '2024-01-01 00:00+00'::timestamptz + 50 * interval '1 second', 'it''s 50')`),
		checksum(t, e.ctx, e.dst, `"My Schema"."Upd"`), "the updater keeps rows deleted on the source")
	e.done(`SELECT mimeo.dml_destroyer('"My Schema"."Dml"')`)
	e.done(`SELECT mimeo.updater_destroyer('"My Schema"."Upd"')`)
}
