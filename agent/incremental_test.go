package agent_test

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

func (e *env) lastValue(table, dest string) string {
	e.t.Helper()
	var v *string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT last_value FROM mimeo.refresh_config_`+table+` WHERE dest_table = $1`, dest).Scan(&v))
	if v == nil {
		return ""
	}
	return *v
}

// Batches end inside runs of equal control values, and one run is longer
// than the batch: every row arrives exactly once.
func TestInserterTiesLargerThanTheBatch(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.events (id bigint PRIMARY KEY, ts timestamptz NOT NULL, v text)`)
	e.exec(e.app, `INSERT INTO public.events
SELECT g, '2024-01-01 00:00+00'::timestamptz + (g / 3) * interval '1 second', 'row ' || g FROM generate_series(1, 40) g`)
	e.exec(e.app, `INSERT INTO public.events SELECT 100 + g, '2024-01-01 00:00:07+00', 'tie' FROM generate_series(1, 25) g`)
	e.exec(e.app, `GRANT SELECT ON public.events TO `+replRole)
	e.startAgent(e.config())

	e.done(`SELECT mimeo.inserter_maker('public.events', 'ts', $1, p_boundary => '1 second', p_pulldata => false)`, e.dblink)
	// p_pulldata false starts after the source's now(): start over from
	// the beginning instead, in small batches.
	e.exec(e.dst, `UPDATE mimeo.refresh_config_inserter SET batch_limit = 4, last_value = NULL`)
	o := e.done(`SELECT mimeo.refresh_inserter('public.events')`)
	require.EqualValues(t, 65, *o.Rows)
	require.Contains(t, *o.Message, "batches")
	e.requireSame("public.events", "public.events")
	require.Equal(t, "2024-01-01 00:00:13.000000+00", e.lastValue("inserter", "public.events"))

	e.exec(e.app, `INSERT INTO public.events SELECT 200 + g, '2024-01-02 00:00+00', 'later tie' FROM generate_series(1, 12) g`)
	o = e.done(`SELECT mimeo.refresh_inserter('public.events', p_limit => 5)`)
	require.EqualValues(t, 12, *o.Rows)
	e.requireSame("public.events", "public.events")
	o = e.done(`SELECT mimeo.refresh_inserter('public.events')`)
	require.EqualValues(t, 0, *o.Rows)
	require.Contains(t, *o.Message, "nothing new")
}

// Serial control columns at and beyond the 32-bit limit; boundary 0 pulls
// up to the newest row.
func TestInserterSerialAroundTwoToThe31(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.small (id integer PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.small SELECT g, g::text FROM generate_series(2147483600, 2147483647) g`)
	e.exec(e.app, `CREATE TABLE public.big (id bigint PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.big SELECT g, g::text FROM generate_series(2147483640, 2147483660) g`)
	e.exec(e.app, `GRANT SELECT ON public.small, public.big TO `+replRole)
	e.startAgent(e.config())

	e.done(`SELECT mimeo.inserter_maker('public.small', 'id', $1, p_boundary => '0')`, e.dblink)
	e.requireSame("public.small", "public.small")
	require.Equal(t, "2147483647", e.lastValue("inserter", "public.small"))

	e.done(`SELECT mimeo.inserter_maker('public.big', 'id', $1)`, e.dblink) // default boundary 1
	require.Equal(t, "2147483659", e.lastValue("inserter", "public.big"))
	e.exec(e.app, `INSERT INTO public.big VALUES (4294967296, 'two to the 32'), (9007199254740993, 'beyond float64')`)
	e.done(`SELECT mimeo.refresh_inserter('public.big', p_limit => 2)`)
	require.Equal(t, "4294967296", e.lastValue("inserter", "public.big"), "boundary 1 holds back the newest row")
	e.exec(e.dst, `UPDATE mimeo.refresh_config_inserter SET boundary = '0' WHERE dest_table = 'public.big'`)
	e.done(`SELECT mimeo.refresh_inserter('public.big')`)
	e.requireSame("public.big", "public.big")
}

// Updated rows replace their old version, by a composite key; condition
// and filter restrict rows and columns.
func TestUpdaterCompositeKeyConditionFilter(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.stock (shop int, item int, qty int, secret text, updated timestamp NOT NULL DEFAULT localtimestamp, PRIMARY KEY (shop, item))`)
	e.exec(e.app, `INSERT INTO public.stock SELECT s, i, s * i, 'x', '2024-01-01'::timestamp + (s * 100 + i) * interval '1 second' FROM generate_series(1, 5) s, generate_series(1, 40) i`)
	e.exec(e.app, `GRANT SELECT ON public.stock TO `+replRole)
	e.startAgent(e.config())

	e.done(`SELECT mimeo.updater_maker('public.stock', 'updated', $1, p_boundary => '0', p_condition => 'shop <> 3',
        p_filter => ARRAY['shop', 'item', 'qty', 'updated'])`, e.dblink)
	want := `(SELECT shop, item, qty, updated FROM public.stock WHERE shop <> 3)`
	require.Equal(t, checksum(t, e.ctx, e.src, want), checksum(t, e.ctx, e.dst, "public.stock"))

	e.exec(e.app, `UPDATE public.stock SET qty = -qty, updated = '2024-06-01' WHERE item % 4 = 0`)
	e.exec(e.app, `INSERT INTO public.stock VALUES (9, 9, 9, 'y', '2024-06-01'), (3, 99, 1, 'z', '2024-06-02')`)
	o := e.done(`SELECT mimeo.refresh_updater('public.stock', p_limit => 7)`)
	require.EqualValues(t, 41, *o.Rows, "40 updated rows outside shop 3, one new")
	require.Equal(t, checksum(t, e.ctx, e.src, want), checksum(t, e.ctx, e.dst, "public.stock"))
	var dups int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) - count(DISTINCT (shop, item)) FROM public.stock`).Scan(&dups))
	require.Zero(t, dups)
}

// With boundary 'auto', a transaction held open across several runs
// holds the bound at its start: its rows arrive after it commits.
func TestAutoBoundaryWaitsForOpenTransactions(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.orders (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())`)
	e.exec(e.app, `INSERT INTO public.orders (id, at) SELECT g, now() - interval '1 hour' FROM generate_series(1, 10) g`)
	e.exec(e.app, `GRANT SELECT ON public.orders TO `+replRole)
	e.startAgent(e.config())

	// Without pg_read_all_stats the agent cannot see other sessions: refused.
	require.Contains(t, e.failed(`SELECT mimeo.inserter_maker('public.orders', 'at', $1, p_boundary => 'auto')`, e.dblink), "pg_read_all_stats")
	e.exec(e.src, `GRANT pg_read_all_stats TO `+replRole)
	e.done(`SELECT mimeo.inserter_maker('public.orders', 'at', $1, p_boundary => 'auto')`, e.dblink)
	require.Equal(t, 10, e.count("public.orders"))

	long, err := pgx.Connect(e.ctx, pgtest.Source().ConnString(e.srcDB, appRole, ""))
	require.NoError(t, err)
	defer long.Close(context.Background())
	tx, err := long.Begin(e.ctx)
	require.NoError(t, err)
	_, err = tx.Exec(e.ctx, `INSERT INTO public.orders (id) VALUES (1000)`) // at = this transaction's start
	require.NoError(t, err)
	time.Sleep(20 * time.Millisecond)
	for i := range 3 {
		e.exec(e.app, `INSERT INTO public.orders (id) VALUES ($1)`, 2000+i)
		e.done(`SELECT mimeo.refresh_inserter('public.orders')`)
	}
	require.Equal(t, 10, e.count("public.orders"), "nothing after the open transaction's start is copied yet")
	require.NoError(t, tx.Commit(e.ctx))
	e.done(`SELECT mimeo.refresh_inserter('public.orders')`)
	e.requireSame("public.orders", "public.orders")
}

func TestIncrementalRepull(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, tbl := range []string{"public.ins", "public.upd"} {
		e.exec(e.app, `CREATE TABLE `+tbl+` (id int PRIMARY KEY, n int, at timestamptz NOT NULL)`)
		e.exec(e.app, `INSERT INTO `+tbl+` SELECT g, g, '2024-01-01 00:00+00'::timestamptz + g * interval '1 minute' FROM generate_series(1, 100) g`)
		e.exec(e.app, `GRANT SELECT ON `+tbl+` TO `+replRole)
	}
	e.startAgent(e.config())
	e.done(`SELECT mimeo.inserter_maker('public.ins', 'at', $1, p_boundary => '0')`, e.dblink)
	e.done(`SELECT mimeo.updater_maker('public.upd', 'at', $1, p_boundary => '0')`, e.dblink)

	// The destination drifted: a range repull puts (start, end) right.
	e.exec(e.dst, `DELETE FROM public.ins WHERE id BETWEEN 10 AND 20`)
	e.exec(e.dst, `UPDATE public.ins SET n = -1 WHERE id BETWEEN 30 AND 40`)
	o := e.done(`SELECT mimeo.refresh_inserter('public.ins', p_repull => true, p_repull_start => '2024-01-01 00:09+00', p_repull_end => '2024-01-01 00:41+00')`)
	require.EqualValues(t, 31, *o.Rows)
	e.requireSame("public.ins", "public.ins")

	// Updater: a row whose control value moved into the range is replaced
	// by key, never duplicated.
	e.exec(e.app, `UPDATE public.upd SET n = 0, at = '2024-01-01 00:05:30+00' WHERE id = 90`)
	e.done(`SELECT mimeo.refresh_updater('public.upd', p_repull => true, p_repull_start => '2024-01-01 00:05+00', p_repull_end => '2024-01-01 00:06+00')`)
	e.requireSame("public.upd", "public.upd")

	// A full repull truncates and reloads in batches.
	e.exec(e.dst, `DELETE FROM public.upd WHERE id > 50`)
	o = e.done(`SELECT mimeo.refresh_updater('public.upd', p_repull => true, p_limit => 30)`)
	require.EqualValues(t, 100, *o.Rows)
	e.requireSame("public.upd", "public.upd")

	// Bad bounds are refused at once, before anything is queued.
	require.Contains(t, e.sqlError(`SELECT mimeo.refresh_inserter('public.ins', p_repull => true, p_repull_start => 'yesterday-ish')`),
		"must be values of the control column")
	require.Contains(t, e.sqlError(`SELECT mimeo.refresh_inserter('public.ins', p_repull => true, p_repull_start => '2026-01-02', p_repull_end => '2026-01-02')`),
		"must be below p_repull_end")
	require.Contains(t, e.sqlError(`SELECT mimeo.refresh_updater('public.upd', p_repull => true, p_repull_start => '5', p_repull_end => 'x')`),
		"must be values of the control column")
}

// Run on a DST change day inside dst_start..dst_end, a timestamp-based table
// pauses; outside that window it runs.
func TestDSTPause(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.src, `ALTER DATABASE `+pgxIdent(e.srcDB)+` SET timezone = 'America/New_York'`)
	e.exec(e.app, `CREATE TABLE public.local (id int PRIMARY KEY, at timestamp NOT NULL)`)
	e.exec(e.app, `INSERT INTO public.local SELECT g, '2024-01-01'::timestamp + g * interval '1 hour' FROM generate_series(1, 10) g`)
	e.exec(e.app, `GRANT SELECT ON public.local TO `+replRole)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.inserter_maker('public.local', 'at', $1, p_boundary => '0')`, e.dblink)
	var dst bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT dst_active FROM mimeo.refresh_config_inserter`).Scan(&dst))
	require.True(t, dst, "a non-UTC source turns the DST pause on")

	refreshAt := func(at time.Time) (string, string) {
		cfg := e.config()
		cfg.Clock = func() time.Time { return at }
		a, err := agent.New(e.ctx, cfg, hclog.NewNullLogger())
		require.NoError(t, err)
		defer a.Close()
		out, err := a.RefreshOnce(e.ctx, "public.local", false)
		require.NoError(t, err)
		return out.Status, out.Message
	}
	// 2024-03-10 01:45 in New York (06:45 UTC) is inside the default 00:30-02:30.
	status, msg := refreshAt(time.Date(2024, 3, 10, 6, 45, 0, 0, time.UTC))
	require.Equal(t, "skipped", status)
	require.Contains(t, msg, "DST change day")
	status, _ = refreshAt(time.Date(2024, 3, 10, 12, 0, 0, 0, time.UTC))
	require.Equal(t, "done", status, "outside the window")
	status, _ = refreshAt(time.Date(2024, 3, 11, 6, 45, 0, 0, time.UTC))
	require.Equal(t, "done", status, "not a change day")
}

func pgxIdent(s string) string { return pgx.Identifier{s}.Sanitize() }

// An existing destination table is used as it is: nothing pulled, and
// replication continues after its highest control value.
func TestInserterOntoExistingTable(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.log (id int PRIMARY KEY, at timestamptz NOT NULL)`)
	e.exec(e.app, `INSERT INTO public.log SELECT g, '2024-01-01 00:00+00'::timestamptz + g * interval '1 minute' FROM generate_series(1, 30) g`)
	e.exec(e.app, `GRANT SELECT ON public.log TO `+replRole)
	e.exec(e.dst, `CREATE TABLE public.log (id int PRIMARY KEY, at timestamptz NOT NULL, note text)`)
	e.exec(e.dst, `INSERT INTO public.log SELECT g, '2024-01-01 00:00+00'::timestamptz + g * interval '1 minute' FROM generate_series(1, 20) g`)
	e.startAgent(e.config())
	o := e.done(`SELECT mimeo.inserter_maker('public.log', 'at', $1, p_boundary => '0')`, e.dblink)
	require.Contains(t, *o.Message, "nothing pulled")
	require.Equal(t, "2024-01-01 00:20:00.000000+00", e.lastValue("inserter", "public.log"))
	e.done(`SELECT mimeo.refresh_inserter('public.log')`)
	require.Equal(t, 30, e.count("public.log"))
}

func TestIncrementalBadInput(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.nokey (n int NOT NULL, at timestamptz, label text)`)
	e.exec(e.app, `CREATE TABLE public.pair (a int, b int, at timestamptz NOT NULL, PRIMARY KEY (a, b))`)
	e.exec(e.app, `GRANT SELECT ON public.nokey, public.pair TO `+replRole)
	e.startAgent(e.config())

	require.Contains(t, e.sqlError(`SELECT mimeo.updater_maker('public.nokey', 'at', $1, p_pk_field => ARRAY['n'])`, e.dblink), "must be given together")
	require.Contains(t, e.sqlError(`SELECT mimeo.inserter_maker('public.nokey', 'at', $1, p_boundary => 'soon')`, e.dblink), "p_boundary")
	require.Contains(t, e.sqlError(`SELECT mimeo.inserter_maker('public.nokey', NULL, $1)`, e.dblink), "p_control_field is required")
	require.Contains(t, e.failed(`SELECT mimeo.inserter_maker('public.nokey', 'nope', $1)`, e.dblink), `control column "nope" is not a column`)
	require.Contains(t, e.failed(`SELECT mimeo.inserter_maker('public.nokey', 'label', $1)`, e.dblink), "must be timestamptz, timestamp or an integer")
	// PostgreSQL reads a bare number as seconds; nobody means that.
	require.Contains(t, e.failed(`SELECT mimeo.inserter_maker('public.nokey', 'at', $1, p_boundary => '5')`, e.dblink),
		"boundary '5' has no unit; for a timestamp control column give an interval such as '5 minutes' (or 'auto')")
	require.Contains(t, e.failed(`SELECT mimeo.updater_maker('public.nokey', 'at', $1, p_boundary => ' 2.5', p_pk_field => ARRAY['n'], p_pk_type => ARRAY['int'])`, e.dblink),
		"boundary '2.5' has no unit")
	require.Contains(t, e.failed(`SELECT mimeo.inserter_maker('public.nokey', 'n', $1, p_boundary => 'auto')`, e.dblink),
		"boundary 'auto' needs a timestamp control column; for an integer control column give an integer boundary such as '1'")
	require.Contains(t, e.failed(`SELECT mimeo.inserter_maker('public.nokey', 'n', $1, p_boundary => '10 minutes')`, e.dblink),
		"boundary '10 minutes' must be a non-negative integer for an integer control column")
	require.Contains(t, e.failed(`SELECT mimeo.updater_maker('public.nokey', 'at', $1)`, e.dblink), "no primary key or unique index")
	require.Contains(t, e.failed(`SELECT mimeo.updater_maker('public.pair', 'at', $1, p_filter => ARRAY['a', 'at'])`, e.dblink),
		"p_filter must include the key columns (a, b) of public.pair")
	require.Contains(t, e.failed(`SELECT mimeo.updater_maker('public.nokey', 'at', $1, p_pk_field => ARRAY['zz'], p_pk_type => ARRAY['int'])`, e.dblink), `p_pk_field names "zz"`)

	require.Contains(t, e.failed(`SELECT mimeo.updater_maker('public.nokey', 'at', $1, p_pk_field => ARRAY['label'], p_pk_type => ARRAY['text'])`, e.dblink), "must be NOT NULL")
	e.done(`SELECT mimeo.updater_maker('public.nokey', 'at', $1, p_pk_field => ARRAY['n'], p_pk_type => ARRAY['int'])`, e.dblink)
	require.Contains(t, e.sqlError(`SELECT mimeo.refresh_updater('public.nokey', p_limit => 0)`), "p_limit must be at least 1")
	require.Contains(t, e.sqlError(`SELECT mimeo.refresh_updater('public.nokey', p_repull_start => '2024-01-01')`), "need p_repull")
	require.Contains(t, e.sqlError(`SELECT mimeo.refresh_inserter('public.nokey')`), "replicated as type updater")
	var configs int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.refresh_config`).Scan(&configs))
	require.Equal(t, 1, configs)
}

// With p_pulldata false the maker copies nothing and replication starts
// where the source is at the maker's time (its now() for a timestamp
// control column, its max for a serial one), as in the original mimeo:
// the first refresh copies only rows written after the maker.
func TestIncrementalMakerWithoutData(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.tz (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())`)
	e.exec(e.app, `INSERT INTO public.tz (id, at) SELECT g, now() - g * interval '1 minute' FROM generate_series(1, 20) g`)
	e.exec(e.app, `CREATE TABLE public.local (id int PRIMARY KEY, at timestamp NOT NULL DEFAULT clock_timestamp())`)
	e.exec(e.app, `INSERT INTO public.local (id, at) SELECT g, localtimestamp - g * interval '1 minute' FROM generate_series(1, 20) g`)
	e.exec(e.app, `CREATE TABLE public.ser (id bigserial PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.ser (v) SELECT 'old ' || g FROM generate_series(1, 20) g`)
	e.exec(e.app, `GRANT SELECT ON public.tz, public.local, public.ser TO `+replRole)
	e.startAgent(e.config())

	var before string
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT clock_timestamp()::text`).Scan(&before))
	for _, c := range []struct{ typ, table, sqlType string }{
		{"inserter", "public.tz", "timestamptz"},
		{"updater", "public.local", "timestamp"},
	} {
		o := e.done(`SELECT mimeo.`+c.typ+`_maker($1, 'at', $2, p_boundary => '0', p_pulldata => false)`, c.table, e.dblink)
		require.Zero(t, e.count(c.table), c.table)
		last := e.lastValue(c.typ, c.table)
		require.NotEmpty(t, last, "%s: last_value is set", c.table)
		var between bool
		require.NoError(t, e.src.QueryRow(e.ctx, `SELECT $1::text::`+c.sqlType+` BETWEEN $2::timestamptz::`+c.sqlType+` AND clock_timestamp()::`+c.sqlType,
			last, before).Scan(&between))
		require.True(t, between, "%s: last_value %s is the source's time at the maker", c.table, last)
		require.Contains(t, *o.Message, "replication starts after at = "+last)
	}
	o := e.done(`SELECT mimeo.inserter_maker('public.ser', 'id', $1, p_boundary => '0', p_pulldata => false)`, e.dblink)
	require.Zero(t, e.count("public.ser"))
	require.Equal(t, "20", e.lastValue("inserter", "public.ser"), "the source's max")
	require.Contains(t, *o.Message, "replication starts after id = 20")

	e.exec(e.app, `INSERT INTO public.tz (id) VALUES (100), (101)`)
	e.exec(e.app, `INSERT INTO public.local (id) VALUES (100), (101), (102)`)
	e.exec(e.app, `UPDATE public.local SET at = clock_timestamp() WHERE id = 5`) // the updater takes a row changed after the maker
	e.exec(e.app, `INSERT INTO public.ser (v) SELECT 'new ' || g FROM generate_series(1, 4) g`)
	o = e.done(`SELECT mimeo.refresh_inserter('public.tz')`)
	require.EqualValues(t, 2, *o.Rows)
	require.Equal(t, checksum(t, e.ctx, e.src, `(SELECT * FROM public.tz WHERE id >= 100)`), checksum(t, e.ctx, e.dst, "public.tz"))
	o = e.done(`SELECT mimeo.refresh_updater('public.local')`)
	require.EqualValues(t, 4, *o.Rows)
	require.Equal(t, checksum(t, e.ctx, e.src, `(SELECT * FROM public.local WHERE id >= 100 OR id = 5)`), checksum(t, e.ctx, e.dst, "public.local"))
	o = e.done(`SELECT mimeo.refresh_inserter('public.ser')`)
	require.EqualValues(t, 4, *o.Rows)
	require.Equal(t, checksum(t, e.ctx, e.src, `(SELECT * FROM public.ser WHERE id > 20)`), checksum(t, e.ctx, e.dst, "public.ser"))
}

// Run messages read as English, before and after the first rows.
func TestIncrementalRunMessages(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.empty (id bigint PRIMARY KEY)`)
	e.exec(e.app, `GRANT SELECT ON public.empty TO `+replRole)
	e.startAgent(e.config())

	o := e.done(`SELECT mimeo.inserter_maker('public.empty', 'id', $1, p_boundary => '0')`, e.dblink)
	require.Equal(t, "nothing new on the source; nothing copied yet", *o.Message)
	e.exec(e.app, `INSERT INTO public.empty SELECT generate_series(1, 3)`)
	o = e.done(`SELECT mimeo.refresh_inserter('public.empty')`)
	require.Equal(t, "copied 3 rows in 1 batch; last_value is 3", *o.Message)
	o = e.done(`SELECT mimeo.refresh_inserter('public.empty')`)
	require.Equal(t, "nothing new on the source; last_value is 3", *o.Message)
}

// With 'auto', a maker that pulls nothing starts where a refresh would
// stop: before the oldest transaction still open on the source, whose rows
// the first refresh then copies (they would be lost otherwise).
func TestMakerWithoutDataKeepsOpenTransactions(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.open (id int PRIMARY KEY, ts timestamptz NOT NULL DEFAULT now())`)
	e.exec(e.app, `INSERT INTO public.open (id, ts) SELECT g, now() - interval '1 hour' FROM generate_series(1, 10) g`)
	// A replication role of its own: roles are the cluster's, and another
	// test checks that replRole lacks pg_read_all_stats.
	const statsRole = "mimeo_repl_stats"
	require.NoError(t, pgtest.CreateRole(e.ctx, pgtest.Source(), statsRole, replPass, "LOGIN"))
	e.exec(e.src, `GRANT pg_read_all_stats TO `+statsRole)
	e.exec(e.app, `GRANT SELECT ON public.open TO `+statsRole)
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET username = $1 WHERE data_source_id = $2`, statsRole, e.dblink)
	e.startAgent(e.config())
	open, err := e.app.Begin(e.ctx)
	require.NoError(t, err)
	defer func() { _ = open.Rollback(e.ctx) }()
	_, err = open.Exec(e.ctx, `INSERT INTO public.open (id) VALUES (100)`) // ts is the transaction's start
	require.NoError(t, err)
	e.done(`SELECT mimeo.updater_maker('public.open', 'ts', $1, p_boundary => 'auto', p_pulldata => false)`, e.dblink)
	require.NoError(t, open.Commit(e.ctx))
	e.exec(e.app, `INSERT INTO public.open (id) VALUES (101)`)
	require.Eventually(t, func() bool {
		e.done(`SELECT mimeo.refresh_updater('public.open')`)
		return e.count("public.open") == 2
	}, 10*time.Second, 200*time.Millisecond, "rows of a transaction open at the maker are copied")
	require.Equal(t, checksum(t, e.ctx, e.src, `(SELECT * FROM public.open WHERE id >= 100)`), checksum(t, e.ctx, e.dst, "public.open"))
}
