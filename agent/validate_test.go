package agent_test

import (
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

// check is a row of mimeo.validation.
type check struct {
	OK         bool
	SourceRows *int64
	DestRows   *int64
	Chunks     *int
	Differing  *int
	Repaired   *bool
	Detail     string
}

// lastCheck is the newest row of mimeo.validation for a table and kind.
func (e *env) lastCheck(table, kind string) check {
	e.t.Helper()
	var c check
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT ok, source_rows, dest_rows, chunks_checked, chunks_differing, repaired, detail
FROM mimeo.validation WHERE dest_table = $1 AND kind = $2 ORDER BY id DESC LIMIT 1`, table, kind).
		Scan(&c.OK, &c.SourceRows, &c.DestRows, &c.Chunks, &c.Differing, &c.Repaired, &c.Detail))
	return c
}

// health is refresh_status' verdict on a table.
func (e *env) health(table string) (string, string) {
	e.t.Helper()
	var health string
	var why *string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT health, why FROM mimeo.refresh_status WHERE dest_table = $1`, table).Scan(&health, &why))
	if why == nil {
		return health, ""
	}
	return health, *why
}

// validationCase is one replication type under validate.
type validationCase struct {
	typ     string
	maker   string // $1 is the dblink
	refresh string
	live    string // the destination's rows that stand for the source's
	pending func(e *env)
}

const valTable = `public."Val; Table"`

var validationCases = []validationCase{
	{typ: "snap", maker: `SELECT mimeo.snapshot_maker('public."Val; Table"', $1)`,
		refresh: `SELECT mimeo.refresh_snap('public."Val; Table"', p_force => true)`},
	{typ: "table", maker: `SELECT mimeo.table_maker('public."Val; Table"', $1)`,
		refresh: `SELECT mimeo.refresh_table('public."Val; Table"')`},
	{typ: "inserter", maker: `SELECT mimeo.inserter_maker('public."Val; Table"', 'id', $1, p_boundary => '0')`,
		refresh: `SELECT mimeo.refresh_inserter('public."Val; Table"')`},
	{typ: "updater", maker: `SELECT mimeo.updater_maker('public."Val; Table"', 'upd', $1, p_boundary => '0 s')`,
		refresh: `SELECT mimeo.refresh_updater('public."Val; Table"')`,
		pending: func(e *env) {
			e.exec(e.app, `UPDATE public."Val; Table" SET note = 'later', upd = clock_timestamp() WHERE id IN (5, 1500)`)
		}},
	{typ: "dml", maker: `SELECT mimeo.dml_maker('public."Val; Table"', $1)`,
		refresh: `SELECT mimeo.refresh_dml('public."Val; Table"')`,
		pending: func(e *env) {
			e.exec(e.app, `UPDATE public."Val; Table" SET note = 'later' WHERE id IN (5, 1500)`)
			e.exec(e.app, `DELETE FROM public."Val; Table" WHERE id = 2500`)
		}},
	{typ: "logdel", maker: `SELECT mimeo.logdel_maker('public."Val; Table"', $1)`,
		refresh: `SELECT mimeo.refresh_logdel('public."Val; Table"')`,
		live:    `(SELECT id, grp, note, upd FROM public."Val; Table" WHERE mimeo_source_deleted IS NULL)`,
		pending: func(e *env) {
			e.exec(e.app, `DELETE FROM public."Val; Table" WHERE id IN (7, 2600)`)
		}},
}

// A healthy copy validates; rows deleted, changed and added behind
// mimeo's back are found chunk by chunk, repaired, and replication goes on
// correctly afterwards. Changes not yet applied are not differences.
func TestValidateFindsAndRepairsDamage(t *testing.T) {
	t.Parallel()
	for _, tc := range validationCases {
		t.Run(tc.typ, func(t *testing.T) {
			t.Parallel()
			e := setup(t)
			e.exec(e.app, `CREATE TABLE `+valTable+` (id int PRIMARY KEY, grp int, note text, upd timestamptz NOT NULL DEFAULT '2026-01-01')`)
			e.exec(e.app, `INSERT INTO `+valTable+` SELECT g, g % 7, CASE WHEN g % 11 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(1, 3000) g`)
			e.exec(e.app, `CREATE INDEX ON `+valTable+` (upd)`)
			e.exec(e.app, `GRANT SELECT ON `+valTable+` TO `+replRole)
			if tc.typ == "dml" || tc.typ == "logdel" {
				e.prepareTriggers(valTable)
			}
			cfg := e.config()
			cfg.ValidateChunkRows = 500
			e.startAgent(cfg)
			e.done(tc.maker, e.dblink)
			live := valTable
			if tc.live != "" {
				live = tc.live
			}
			e.requireSame(valTable, live)

			o := e.done(`SELECT mimeo.validate($1)`, valTable)
			require.True(t, strings.HasPrefix(*o.Message, "ok: "), *o.Message)
			c := e.lastCheck(valTable, "checksum")
			require.True(t, c.OK, c.Detail)
			require.EqualValues(t, 3000, *c.SourceRows)
			require.EqualValues(t, 3000, *c.DestRows)
			require.Equal(t, 6, *c.Chunks)
			require.Zero(t, *c.Differing)
			require.Nil(t, c.Repaired)
			health, why := e.health(valTable)
			require.Equal(t, "ok", health, why)

			// Damage three chunks behind mimeo's back.
			e.exec(e.dst, `DELETE FROM `+valTable+` WHERE id BETWEEN 10 AND 19`)
			e.exec(e.dst, `UPDATE `+valTable+` SET note = 'drift' WHERE id = 1200`)
			e.exec(e.dst, `DELETE FROM `+valTable+` WHERE id = 2999`)
			if tc.typ == "logdel" {
				e.exec(e.dst, `INSERT INTO `+valTable+` (id, grp, note, upd) VALUES (2999, 1, 'ghost', now())`)
			}
			o = e.done(`SELECT mimeo.validate($1)`, valTable)
			require.True(t, strings.HasPrefix(*o.Message, "differs: 3 of 6 chunks differ"), *o.Message)
			c = e.lastCheck(valTable, "checksum")
			require.False(t, c.OK)
			require.Equal(t, 3, *c.Differing)
			require.EqualValues(t, 3000, *c.SourceRows)
			health, why = e.health(valTable)
			require.Equal(t, "invalid", health)
			require.Contains(t, why, "3 of 6 chunks differ")

			// validate_rowcount sees the missing rows too.
			e.done(`SELECT mimeo.validate_rowcount($1)`, valTable)
			rc := e.lastCheck(valTable, "rowcount")
			require.False(t, rc.OK, rc.Detail)
			require.EqualValues(t, 3000, *rc.SourceRows)

			o = e.done(`SELECT mimeo.validate($1, p_repair => true)`, valTable)
			require.Contains(t, *o.Message, "repaired: re-pulled")
			c = e.lastCheck(valTable, "checksum")
			require.False(t, c.OK, "the check found differences")
			require.True(t, *c.Repaired, c.Detail)
			e.requireSame(valTable, live)
			health, why = e.health(valTable)
			require.Equal(t, "ok", health, why)

			// Changes not applied yet are left out, not counted.
			if tc.pending != nil {
				tc.pending(e)
				e.done(`SELECT mimeo.validate($1)`, valTable)
				c = e.lastCheck(valTable, "checksum")
				require.True(t, c.OK, c.Detail)
				require.Contains(t, c.Detail, "left out")
				e.done(`SELECT mimeo.validate_rowcount($1)`, valTable)
				rc = e.lastCheck(valTable, "rowcount")
				require.True(t, rc.OK, rc.Detail)
			}

			// Replication goes on correctly after the repair.
			e.exec(e.app, `INSERT INTO `+valTable+` SELECT g, 0, 'more', clock_timestamp() FROM generate_series(3001, 3100) g`)
			e.exec(e.app, `UPDATE `+valTable+` SET note = 'changed', upd = clock_timestamp() WHERE id = 11`)
			if tc.typ == "inserter" {
				// An inserter copies inserts only.
				e.exec(e.app, `UPDATE `+valTable+` SET note = NULL, upd = '2026-01-01' WHERE id = 11`)
			}
			e.done(tc.refresh)
			e.requireSame(valTable, live)
			e.done(`SELECT mimeo.validate($1)`, valTable)
			c = e.lastCheck(valTable, "checksum")
			require.True(t, c.OK, c.Detail)
		})
	}
}

// A logical table is compared once the stream caught up, and repaired by
// a fresh copy.
func TestValidateLogical(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE `+valTable+` (id int PRIMARY KEY, grp int, note text)`)
	e.exec(e.app, `INSERT INTO `+valTable+` SELECT g, g % 7, 'n' || g FROM generate_series(1, 2000) g`)
	e.exec(e.app, `GRANT SELECT ON `+valTable+` TO `+logicalRole)
	cfg := e.config()
	cfg.ValidateChunkRows = 500
	e.startAgent(cfg)
	e.done(`SELECT mimeo.logical_maker($1, $2)`, valTable, e.dblink)
	e.exec(e.app, `UPDATE `+valTable+` SET note = 'streamed' WHERE id % 100 = 0`)
	e.done(`SELECT mimeo.validate($1)`, valTable) // waits for the stream
	c := e.lastCheck(valTable, "checksum")
	require.True(t, c.OK, c.Detail)
	require.Equal(t, 4, *c.Chunks)

	e.exec(e.dst, `DELETE FROM `+valTable+` WHERE id = 42`)
	e.done(`SELECT mimeo.validate_rowcount($1)`, valTable)
	require.False(t, e.lastCheck(valTable, "rowcount").OK)
	e.done(`SELECT mimeo.validate($1)`, valTable)
	c = e.lastCheck(valTable, "checksum")
	require.False(t, c.OK)
	require.Equal(t, 1, *c.Differing)

	o := e.done(`SELECT mimeo.validate($1, p_repair => true)`, valTable)
	require.Contains(t, *o.Message, "copied")
	require.True(t, *e.lastCheck(valTable, "checksum").Repaired)
	e.waitState(valTable, "ready")
	e.exec(e.app, `INSERT INTO `+valTable+` VALUES (5000, 1, 'after repair')`)
	e.sync(valTable)
	e.requireSame(valTable, valTable)
}

// check_source_columns and check_missing_source_tables report the tables
// whose source drifted or went away, and only those.
func TestCheckSourceColumnsAndMissingTables(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, tbl := range []string{"public.a", "public.b", `public."C c"`} {
		e.exec(e.app, `CREATE TABLE `+tbl+` (id int PRIMARY KEY, v text)`)
		e.exec(e.app, `INSERT INTO `+tbl+` SELECT g, 'v' FROM generate_series(1, 10) g`)
		e.exec(e.app, `GRANT SELECT ON `+tbl+` TO `+replRole)
	}
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.a', $1)`, e.dblink)
	e.done(`SELECT mimeo.updater_maker('public.b', 'id', $1, p_boundary => '0')`, e.dblink)
	e.done(`SELECT mimeo.inserter_maker('public."C c"', 'id', $1, p_boundary => '0')`, e.dblink)

	o := e.done(`SELECT mimeo.check_source_columns()`)
	require.Equal(t, "ok: all 3 tables", *o.Message)
	e.exec(e.app, `ALTER TABLE public.b ADD COLUMN extra int`)
	e.exec(e.app, `DROP TABLE public."C c"`)
	o = e.done(`SELECT mimeo.check_source_columns()`)
	require.Contains(t, *o.Message, "2 of 3 tables")
	require.True(t, e.lastCheck("public.a", "columns").OK)
	b := e.lastCheck("public.b", "columns")
	require.False(t, b.OK)
	require.Contains(t, b.Detail, "extra")
	require.Contains(t, b.Detail, "refresh_updater('public.b', p_repull => true)")
	require.Contains(t, e.lastCheck(`public."C c"`, "columns").Detail, "does not exist")
	health, why := e.health("public.b")
	require.Equal(t, "invalid", health)
	require.Contains(t, why, "extra")

	o = e.done(`SELECT mimeo.check_missing_source_tables()`)
	require.Contains(t, *o.Message, "1 of 3 tables")
	require.True(t, e.lastCheck("public.b", "missing").OK)
	missing := e.lastCheck(`public."C c"`, "missing")
	require.False(t, missing.OK)
	require.Contains(t, missing.Detail, "inserter_destroyer")

	// A source that cannot be reached fails its tables' checks, in words.
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET pwd = 'wrong' WHERE data_source_id = $1`, e.dblink)
	o = e.done(`SELECT mimeo.check_missing_source_tables()`)
	require.Contains(t, *o.Message, "3 of 3 tables")
	require.Contains(t, e.lastCheck("public.a", "missing").Detail, "cannot reach its source")
}

// snapshot_monitor flags snap tables past a size; refresh_snap(p_force)
// copies an unchanged source; a CALL with p_debug shows the steps.
func TestSnapshotMonitorForceAndDebugNotices(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 2000)
	e.createItems("public.small", 10)
	e.exec(e.app, `ANALYZE public.items; ANALYZE public.small`)
	for deadline := time.Now().Add(15 * time.Second); e.stats("public.small") != "10,0,0"; {
		require.True(t, time.Now().Before(deadline), "statistics of public.small never showed its inserts")
		time.Sleep(50 * time.Millisecond)
	}
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	e.done(`SELECT mimeo.snapshot_maker('public.small', $1)`, e.dblink)

	o := e.done(`SELECT mimeo.snapshot_monitor(p_rowcount => 1000)`)
	require.Contains(t, *o.Message, "1 of 2 tables")
	items := e.lastCheck("public.items", "snapshot_monitor")
	require.False(t, items.OK)
	require.EqualValues(t, 2000, *items.SourceRows)
	require.Contains(t, items.Detail, "large: about 2000 rows")
	require.True(t, e.lastCheck("public.small", "snapshot_monitor").OK)
	health, _ := e.health("public.items")
	require.Equal(t, "ok", health, "a size report is advice, not a fault")

	o = e.done(`SELECT mimeo.refresh_snap('public.small')`)
	require.Contains(t, *o.Message, "skipped copy")
	o = e.done(`SELECT mimeo.refresh_snap('public.small', p_force => true)`)
	require.EqualValues(t, 10, *o.Rows)

	// CALL ..._wait(p_debug => true) relays the steps as NOTICEs.
	cc, err := pgx.ParseConfig(pgtest.Destination().ConnString(e.dstDB, agentRole, ""))
	require.NoError(t, err)
	var notices []string
	cc.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n.Message) }
	conn, err := pgx.ConnectConfig(e.ctx, cc)
	require.NoError(t, err)
	defer conn.Close(e.ctx)
	_, err = conn.Exec(e.ctx, `CALL mimeo.validate_wait('public.items', p_debug => true)`)
	require.NoError(t, err)
	joined := strings.Join(notices, "\n")
	require.Contains(t, joined, "mimeo: Connect to source [OK")
	require.Contains(t, joined, "mimeo: Compare [OK")
	require.Contains(t, joined, "validate done: ok: 2000 rows")

	e.exec(e.dst, `DELETE FROM public.items WHERE id = 1`)
	notices = nil
	_, err = conn.Exec(e.ctx, `CALL mimeo.validate_wait('public.items')`)
	require.NoError(t, err)
	joined = strings.Join(notices, "\n")
	require.NotContains(t, joined, "Compare [OK", "steps only with p_debug")
	require.Contains(t, joined, "checksum public.items: 1 of 1 chunk differ")
}

// Bad input is refused at the call, before anything is queued.
func TestValidationInput(t *testing.T) {
	t.Parallel()
	e := setup(t)
	require.Contains(t, e.sqlError(`SELECT mimeo.validate('public.nothing')`), "public.nothing is not a replicated table")
	require.Contains(t, e.sqlError(`SELECT mimeo.validate_rowcount('nothing')`), "schema-qualified")
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_monitor(p_rowcount => -1)`), "must not be negative")
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_monitor(p_destination => 'public.x; DROP TABLE y')`), "is not a valid name")
}

// A destroyer whose source cannot be reached refuses, unless forced; then
// it removes the destination side and says what to run on the source.
func TestForcedDestroyers(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public."Dml; t" (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `CREATE TABLE public.lg (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public."Dml; t" VALUES (1, 'a')`)
	e.exec(e.app, `INSERT INTO public.lg VALUES (1, 'a')`)
	e.exec(e.src, `CREATE SCHEMA IF NOT EXISTS mimeo AUTHORIZATION `+logicalRole)
	e.exec(e.app, `GRANT SELECT, TRIGGER ON public."Dml; t", public.lg TO `+logicalRole)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public."Dml; t"', $1)`, e.dblink)
	e.done(`SELECT mimeo.logical_maker('public.lg', $1)`, e.dblink)
	before := e.sourceObjects()
	require.NotZero(t, before)

	var pwd string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT pwd FROM mimeo.dblink_mapping WHERE data_source_id = $1`, e.dblink).Scan(&pwd))
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET pwd = 'wrong' WHERE data_source_id = $1`, e.dblink)
	require.Contains(t, e.failed(`SELECT mimeo.dml_destroyer('public."Dml; t"')`), "p_force => true")
	o := e.done(`SELECT mimeo.dml_destroyer('public."Dml; t"', p_force => true)`)
	require.Contains(t, *o.Message, `dropped public."Dml; t"`)
	require.Contains(t, *o.Message, "DROP FUNCTION IF EXISTS")
	dmlSQL := (*o.Message)[strings.Index(*o.Message, "DROP FUNCTION"):]
	o = e.done(`SELECT mimeo.logical_destroyer('public.lg', p_force => true)`)
	require.Contains(t, *o.Message, "dropped public.lg")
	require.Contains(t, *o.Message, "pg_drop_replication_slot(")
	slotSQL := (*o.Message)[strings.Index(*o.Message, "SELECT pg_drop_replication_slot"):strings.Index(*o.Message, " (its last")]
	require.Zero(t, e.count(`mimeo.refresh_config`))
	require.Zero(t, e.count(`mimeo.logical_source`))
	for _, tbl := range []string{`public."Dml; t"`, "public.lg"} {
		var exists bool
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT to_regclass($1) IS NOT NULL`, tbl).Scan(&exists))
		require.False(t, exists, tbl)
	}

	// The source side stayed; the SQL given removes it.
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET pwd = $2 WHERE data_source_id = $1`, e.dblink, pwd)
	require.Equal(t, before, e.sourceObjects())
	require.NotEmpty(t, e.slots())
	e.exec(e.src, dmlSQL)
	e.exec(e.src, slotSQL)
	require.Zero(t, e.sourceObjects())
	require.Empty(t, e.slots())
}

// inserter and updater keep the rows their source deleted: those are not
// differences, and a repair leaves them alone.
func TestValidateKeepsRowsTheSourceDeleted(t *testing.T) {
	t.Parallel()
	for _, typ := range []string{"inserter", "updater"} {
		t.Run(typ, func(t *testing.T) {
			t.Parallel()
			e := setup(t)
			e.exec(e.app, `CREATE TABLE public.k (id int PRIMARY KEY, note text, upd timestamptz NOT NULL DEFAULT '2026-01-01')`)
			e.exec(e.app, `INSERT INTO public.k SELECT g, 'n' || g FROM generate_series(1, 2000) g`)
			e.exec(e.app, `GRANT SELECT ON public.k TO `+replRole)
			cfg := e.config()
			cfg.ValidateChunkRows = 500
			e.startAgent(cfg)
			if typ == "inserter" {
				e.done(`SELECT mimeo.inserter_maker('public.k', 'id', $1, p_boundary => '0')`, e.dblink)
			} else {
				e.done(`SELECT mimeo.updater_maker('public.k', 'upd', $1, p_boundary => '0 s')`, e.dblink)
			}
			e.exec(e.app, `DELETE FROM public.k WHERE id BETWEEN 100 AND 199`)
			o := e.done(`SELECT mimeo.validate($1)`, "public.k")
			require.True(t, strings.HasPrefix(*o.Message, "ok: "), *o.Message)
			require.Contains(t, *o.Message, "100 destination rows the source no longer has are kept")
			o = e.done(`SELECT mimeo.validate_rowcount($1)`, "public.k")
			require.True(t, strings.HasPrefix(*o.Message, "ok: source 1900 rows, destination 2000"), *o.Message)

			// Real damage is still found, and repaired without the kept rows going.
			e.exec(e.dst, `DELETE FROM public.k WHERE id = 1500`)
			e.exec(e.dst, `UPDATE public.k SET note = 'drift' WHERE id = 1700`)
			o = e.done(`SELECT mimeo.validate($1, p_repair => true)`, "public.k")
			require.Contains(t, *o.Message, "differs: 2 of 4 chunks differ", *o.Message)
			c := e.lastCheck("public.k", "checksum")
			require.True(t, *c.Repaired, c.Detail)
			require.Equal(t, 2000, e.count("public.k"), "the 100 rows deleted on the source stay")
			e.requireSame(`(SELECT * FROM public.k WHERE id NOT BETWEEN 100 AND 199)`, `(SELECT * FROM public.k WHERE id NOT BETWEEN 100 AND 199)`)

			// A TRUNCATE of the source empties nothing here.
			e.exec(e.app, `TRUNCATE public.k`)
			o = e.done(`SELECT mimeo.validate($1, p_repair => true)`, "public.k")
			require.True(t, strings.HasPrefix(*o.Message, "ok: "), *o.Message)
			require.Equal(t, 2000, e.count("public.k"))
		})
	}
}

// A TRUNCATE queued on a dml source is not a difference until the
// refresh that applies it; the health of a table is the newest check of
// each kind, so a passing row count does not hide a failed checksum.
func TestValidateQueuedTruncateAndHealthByKind(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, 'v' FROM generate_series(1, 300) g`)
	e.prepareTriggers("public.t")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)

	e.exec(e.dst, `UPDATE public.t SET v = 'drift' WHERE id = 3`)
	e.done(`SELECT mimeo.validate('public.t')`)
	e.done(`SELECT mimeo.validate_rowcount('public.t')`)
	require.True(t, e.lastCheck("public.t", "rowcount").OK)
	health, why := e.health("public.t")
	require.Equal(t, "invalid", health, "the row count passing does not clear the checksum")
	require.Contains(t, why, "checksum at")
	e.done(`SELECT mimeo.validate('public.t', p_repair => true)`)
	health, why = e.health("public.t")
	require.Equal(t, "ok", health, why)

	e.exec(e.app, `TRUNCATE public.t`)
	o := e.done(`SELECT mimeo.validate('public.t', p_repair => true)`)
	require.Contains(t, *o.Message, "ok: ")
	require.Contains(t, *o.Message, "a TRUNCATE of the source is queued")
	require.Equal(t, 300, e.count("public.t"), "nothing repaired before the refresh applies the TRUNCATE")
	e.done(`SELECT mimeo.validate_rowcount('public.t')`)
	require.True(t, e.lastCheck("public.t", "rowcount").OK)
	e.done(`SELECT mimeo.refresh_dml('public.t')`)
	e.done(`SELECT mimeo.validate('public.t')`)
	require.True(t, e.lastCheck("public.t", "checksum").OK)
	require.Zero(t, e.count("public.t"))
}

// A text key that sorts by another collation on the destination would cut
// the sides' ranges differently: it is compared, and repaired, whole.
func TestValidateKeyUnderAnotherCollation(t *testing.T) {
	t.Parallel()
	e := setup(t)
	var icu bool
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT EXISTS (SELECT 1 FROM pg_collation WHERE collname = 'en-x-icu')`).Scan(&icu))
	if !icu {
		t.Skip("the source server has no ICU collations")
	}
	e.exec(e.app, `CREATE TABLE public.icu (k text COLLATE "en-x-icu" PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.icu SELECT 'k' || lpad(g::text, 5, '0'), g FROM generate_series(1, 3000) g`)
	e.exec(e.app, `INSERT INTO public.icu VALUES ('k1000_', 0), ('k2000_', 0), ('K1000', 0), ('k-1', 0)`)
	e.prepareTriggers("public.icu")
	cfg := e.config()
	cfg.ValidateChunkRows = 500
	e.startAgent(cfg)
	e.done(`SELECT mimeo.dml_maker('public.icu', $1)`, e.dblink)
	o := e.done(`SELECT mimeo.validate('public.icu')`)
	require.True(t, strings.HasPrefix(*o.Message, "ok: "), *o.Message)
	require.Contains(t, *o.Message, "orders differently")
	e.exec(e.dst, `DELETE FROM public.icu WHERE k = 'k1000_'`)
	o = e.done(`SELECT mimeo.validate('public.icu', p_repair => true)`)
	require.Contains(t, *o.Message, "every chunk matches now")
	e.requireSame("public.icu", "public.icu")
}
