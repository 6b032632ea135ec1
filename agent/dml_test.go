package agent_test

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

// prepareTriggers gives the replication role what dml/logdel need on the
// source: its own mimeo schema and TRIGGER on the table.
func (e *env) prepareTriggers(tables ...string) {
	e.t.Helper()
	e.exec(e.src, `CREATE SCHEMA IF NOT EXISTS mimeo AUTHORIZATION `+replRole)
	for _, tbl := range tables {
		e.exec(e.app, `GRANT SELECT, TRIGGER ON `+tbl+` TO `+replRole)
	}
}

// sourceObjects lists what lives in the source's mimeo schema and the
// triggers on the source's tables.
func (e *env) sourceObjects() int {
	e.t.Helper()
	var n int
	require.NoError(e.t, e.src.QueryRow(e.ctx, `
SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = 'mimeo'::regnamespace)
     + (SELECT count(*) FROM pg_proc WHERE pronamespace = 'mimeo'::regnamespace)
     + (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal)`).Scan(&n))
	return n
}

func TestDMLReplaysInsertsUpdatesDeletes(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public."Order Lines" ("order" int, line int, qty numeric, note text, PRIMARY KEY ("order", line))`)
	e.exec(e.app, `INSERT INTO public."Order Lines" SELECT g / 10, g % 10, g * 1.5, CASE WHEN g % 3 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(1, 500) g`)
	e.prepareTriggers(`public."Order Lines"`)
	e.startAgent(e.config())
	tbl := `public."Order Lines"`
	o := e.done(`SELECT mimeo.dml_maker($1, $2)`, tbl, e.dblink)
	require.EqualValues(t, 500, *o.Rows)
	e.requireSame(tbl, tbl)

	// Writes by the application role, which has no rights on the queue.
	for _, q := range []string{
		`INSERT INTO public."Order Lines" VALUES (900, 1, 1, E'new\ttab'), (900, 2, NULL, NULL)`,
		`UPDATE public."Order Lines" SET qty = qty * 2 WHERE line = 3`,
		`DELETE FROM public."Order Lines" WHERE "order" = 7`,
		`UPDATE public."Order Lines" SET "order" = 1000 WHERE "order" = 8`, // key change: old and new keys queued
		`INSERT INTO public."Order Lines" VALUES (901, 1, 1, 'gone') `,
		`DELETE FROM public."Order Lines" WHERE "order" = 901`,
	} {
		e.exec(e.app, q)
	}
	o = e.done(`SELECT mimeo.refresh_dml($1, p_limit => 7)`, tbl)
	require.Contains(t, *o.Message, "batches")
	e.requireSame(tbl, tbl)
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM pg_class c WHERE c.relnamespace = 'mimeo'::regnamespace AND c.relkind = 'r'`).Scan(&queued))
	require.Equal(t, 1, queued)

	e.done(`SELECT mimeo.dml_destroyer($1)`, tbl)
	require.Zero(t, e.sourceObjects(), "destroyer leaves no queue, function or trigger")
	var exists bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT to_regclass($1) IS NOT NULL`, tbl).Scan(&exists))
	require.False(t, exists)
}

func TestLogdelKeepsDeletedRows(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.people (id int PRIMARY KEY, name text, born date)`)
	e.exec(e.app, `INSERT INTO public.people SELECT g, 'p' || g, '2000-01-01'::date + g FROM generate_series(1, 100) g`)
	e.prepareTriggers("public.people")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logdel_maker('public.people', $1)`, e.dblink)

	e.exec(e.app, `UPDATE people SET name = 'renamed' WHERE id = 5`)
	e.exec(e.app, `DELETE FROM people WHERE id BETWEEN 10 AND 19`)
	e.exec(e.app, `DELETE FROM people WHERE id = 30`)
	e.exec(e.app, `INSERT INTO people VALUES (30, 'back again', NULL)`) // deleted and re-inserted in one batch
	e.done(`SELECT mimeo.refresh_logdel('public.people')`)

	live := `(SELECT id, name, born FROM public.people WHERE mimeo_source_deleted IS NULL)`
	require.Equal(t, checksum(t, e.ctx, e.src, "public.people"), checksum(t, e.ctx, e.dst, live))
	var deleted int
	var name string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FILTER (WHERE mimeo_source_deleted IS NOT NULL), max(name) FILTER (WHERE id = 12) FROM public.people`).Scan(&deleted, &name))
	require.Equal(t, 10, deleted, "deleted rows stay, marked")
	require.Equal(t, "p12", name, "with their last values")

	// A deleted key inserted again later comes back live.
	e.exec(e.app, `INSERT INTO people VALUES (12, 'reborn', NULL)`)
	e.done(`SELECT mimeo.refresh_logdel('public.people')`)
	require.Equal(t, checksum(t, e.ctx, e.src, "public.people"), checksum(t, e.ctx, e.dst, live))

	// Repull reloads live rows and keeps the deletion history.
	e.exec(e.dst, `UPDATE public.people SET name = 'drift' WHERE id = 1`)
	e.done(`SELECT mimeo.refresh_logdel('public.people', p_repull => true)`)
	require.Equal(t, checksum(t, e.ctx, e.src, "public.people"), checksum(t, e.ctx, e.dst, live))
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM public.people WHERE mimeo_source_deleted IS NOT NULL`).Scan(&deleted))
	require.Equal(t, 9, deleted)
}

// A crash between the destination's commit and the source queue's cleanup
// leaves the entries queued; the next run applies them again, harmlessly.
func TestDMLCrashBeforeQueueCleanup(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 50) g`)
	e.prepareTriggers("public.t")
	crashing := e.config()
	crashing.FaultHook = func(point string) error {
		if point == "after destination commit" {
			return fmt.Errorf("injected crash %s", point)
		}
		return nil
	}
	stopCrashing := e.startAgent(crashing)
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	e.exec(e.app, `UPDATE t SET v = -v WHERE id <= 20`)
	e.exec(e.app, `DELETE FROM t WHERE id > 45`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.t')`), "injected crash")
	e.requireSame("public.t", "public.t") // the destination did commit
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Equal(t, 25, queued, "the entries stay queued on the source")

	e.exec(e.app, `UPDATE t SET v = 0 WHERE id = 1`)
	stopCrashing()
	e.startAgent(e.config())
	e.done(`SELECT mimeo.refresh_dml('public.t')`)
	e.requireSame("public.t", "public.t")
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Zero(t, queued, "queue drained")
}

// The source reads the next batch while the destination applies one. A
// batch the destination refuses fails the run: the batches before it stay
// committed, no entry of it or of the batch read ahead is lost, and once
// the cause is gone the next run makes the copy exact.
func TestDMLBatchRefusedWhileTheNextIsRead(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 60) g`)
	e.prepareTriggers("public.t")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	e.exec(e.dst, `ALTER TABLE public.t ADD CONSTRAINT small CHECK (v < 1000)`)
	// Queued in this order: batch 1 (ids 1-10), then the refused row in
	// batch 2, then 3 more batches.
	e.exec(e.app, `UPDATE t SET v = -v WHERE id <= 10`)
	e.exec(e.app, `UPDATE t SET v = 5000 WHERE id = 11`)
	e.exec(e.app, `UPDATE t SET v = -v WHERE id BETWEEN 12 AND 40`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.t', p_limit => 10)`), "small")
	var batch1, refused int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FILTER (WHERE id <= 10 AND v < 0), count(*) FILTER (WHERE id = 11 AND v = 11) FROM public.t`).Scan(&batch1, &refused))
	require.Equal(t, 10, batch1, "the first batch committed")
	require.Equal(t, 1, refused, "the refused batch left nothing")
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(DISTINCT id) FILTER (WHERE id > 10) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Equal(t, 30, queued, "every entry after the first batch is still queued")

	e.exec(e.dst, `ALTER TABLE public.t DROP CONSTRAINT small`)
	e.done(`SELECT mimeo.refresh_dml('public.t', p_limit => 10)`)
	e.requireSame("public.t", "public.t")
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Zero(t, queued, "queue drained")
}

// Batches are read in row address order. Entries written during a run
// into space freed before the place it has read up to are still applied by
// that run: it looks again from the start before it ends.
func TestDMLRunAppliesEntriesWrittenBehindIt(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 3000) g`)
	e.prepareTriggers("public.t")
	var q string // the queue, once made
	var once sync.Once
	cfg := e.config()
	cfg.FaultHook = func(point string) error {
		if point != "after destination commit" {
			return nil
		}
		once.Do(func() {
			// The entries of the first run's batches are dead: a VACUUM
			// frees their pages, and new entries land there.
			e.exec(e.src, `VACUUM `+q)
			e.exec(e.app, `UPDATE t SET v = 0 WHERE id <= 200`)
		})
		return nil
	}
	stopPlain := e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	q = "mimeo." + queueName(t, e)
	e.exec(e.dst, `ALTER TABLE public.t ADD CONSTRAINT small CHECK (v < 100000)`)
	e.exec(e.app, `UPDATE t SET v = -v WHERE id <= 1000`)
	e.exec(e.app, `UPDATE t SET v = 100000 WHERE id = 1001`)
	e.exec(e.app, `UPDATE t SET v = -v WHERE id > 1001`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.t', p_limit => 500)`), "small")
	e.exec(e.dst, `ALTER TABLE public.t DROP CONSTRAINT small`)
	e.exec(e.app, `UPDATE t SET v = 1 WHERE id = 1001`)
	stopPlain()
	e.startAgent(cfg)
	e.done(`SELECT mimeo.refresh_dml('public.t', p_limit => 500)`)
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM `+q).Scan(&queued))
	require.Zero(t, queued, "the entries written behind the run were applied by it")
	e.requireSame("public.t", "public.t")
}

func queueName(t *testing.T, e *env) string {
	var q string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT (parse_ident(queue_table))[2] FROM mimeo.refresh_config_dml`).Scan(&q))
	return pgxIdent(q)
}

// Two destinations replicate one source table, each through its own queue;
// destroying one leaves the other working.
func TestTwoDestinationsOneSourceTable(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 30) g`)
	e.prepareTriggers("public.t")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1, 'public.t_a')`, e.dblink)
	e.done(`SELECT mimeo.logdel_maker('public.t', $1, 'public.t_b')`, e.dblink)
	e.exec(e.app, `UPDATE t SET v = 7 WHERE id < 5`)
	e.done(`SELECT mimeo.refresh_dml('public.t_a')`)
	e.done(`SELECT mimeo.dml_destroyer('public.t_a')`)
	e.exec(e.app, `DELETE FROM t WHERE id = 29`)
	e.done(`SELECT mimeo.refresh_logdel('public.t_b')`)
	require.Equal(t, checksum(t, e.ctx, e.src, "public.t"),
		checksum(t, e.ctx, e.dst, "(SELECT id, v FROM public.t_b WHERE mimeo_source_deleted IS NULL)"))
	e.done(`SELECT mimeo.logdel_destroyer('public.t_b')`)
	require.Zero(t, e.sourceObjects())
}

func TestDMLMakerBadInput(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `CREATE TABLE public.nokey (v int)`)
	e.exec(e.app, `GRANT SELECT ON public.t, public.nokey TO `+replRole)
	e.startAgent(e.config())

	require.Contains(t, e.failed(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink), "CREATE SCHEMA mimeo AUTHORIZATION")
	e.exec(e.src, `CREATE SCHEMA mimeo`) // owned by the superuser, not the replication role
	require.Contains(t, e.failed(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink), "ALTER SCHEMA mimeo OWNER TO")
	e.exec(e.src, `ALTER SCHEMA mimeo OWNER TO `+replRole)
	require.Contains(t, e.failed(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink), "GRANT SELECT, TRIGGER ON public.t TO mimeo_repl")
	require.Contains(t, e.failed(`SELECT mimeo.logdel_maker('public.nokey', $1)`, e.dblink), "no primary key or unique index")
	require.Contains(t, e.failed(`SELECT mimeo.dml_maker('public.t', $1, p_filter => ARRAY['v'])`, e.dblink),
		"p_filter must include the key columns (id) of public.t")
	require.Contains(t, e.sqlError(`SELECT mimeo.dml_maker('public.t', $1, p_pk_type => ARRAY['int'])`, e.dblink), "must be given together")
	require.Zero(t, e.sourceObjects(), "nothing half-created on the source")

	// A failure after the source objects exist (the destination lacks the
	// column's type) removes them again.
	e.exec(e.app, `CREATE TYPE mood AS ENUM ('ok', 'meh')`)
	e.exec(e.app, `CREATE TABLE public.moods (id int PRIMARY KEY, m mood)`)
	e.prepareTriggers("public.moods")
	require.Contains(t, e.failed(`SELECT mimeo.dml_maker('public.moods', $1)`, e.dblink), `type "mood" does not exist`)
	require.Zero(t, e.sourceObjects(), "the failed maker cleaned up the source")
	var configs int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.refresh_config`).Scan(&configs))
	require.Zero(t, configs)
}

// An agent killed at random points of a long replay: after each restart
// the replay goes on, and in the end the destination equals the source.
func TestDMLKilledDuringLongReplay(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.big (id int PRIMARY KEY, v int, s text)`)
	e.exec(e.app, `INSERT INTO public.big SELECT g, g, md5(g::text) FROM generate_series(1, 40000) g`)
	e.prepareTriggers("public.big")
	cmd := e.startAgentProcess()
	e.done(`SELECT mimeo.dml_maker('public.big', $1)`, e.dblink)
	// 200,000 queued changes: updates, deletes, inserts and key changes.
	for i := range 4 {
		e.exec(e.app, `UPDATE big SET v = v + 1, s = s || 'u' WHERE id % 4 <> $1`, i)
		e.exec(e.app, `DELETE FROM big WHERE id % 97 = $1`, i)
		e.exec(e.app, `INSERT INTO big SELECT 100000 * ($1 + 1) + g, g, 'new' FROM generate_series(1, 5000) g`, i)
	}
	e.exec(e.app, `UPDATE big SET id = -id WHERE id % 1000 = 0`)
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Greater(t, queued, 140000)
	e.exec(e.dst, `UPDATE mimeo.refresh_config_dml SET batch_limit = 5000`)

	id := e.request(`SELECT mimeo.refresh_dml('public.big')`)
	for kill := range 3 {
		// Let it apply some batches, then kill it wherever it is.
		time.Sleep(time.Duration(300+kill*250) * time.Millisecond)
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
		cmd = e.startAgentProcess()
	}
	o := e.await(id)
	if o.Status != "done" { // used up its attempts while being killed: ask again
		o = e.await(e.request(`SELECT mimeo.refresh_dml('public.big')`))
	}
	require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
	e.requireSame("public.big", "public.big")
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Zero(t, queued)
}

// A repull that fails loses no queued change.
func TestDMLRepullFailureKeepsTheQueue(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 100) g`)
	e.prepareTriggers("public.t")
	cfg := e.config()
	var failures atomic.Int32
	cfg.FaultHook = func(point string) error {
		if point == "repull before destination commit" && failures.Add(1) == 1 {
			return fmt.Errorf("injected failure %s", point)
		}
		return nil
	}
	e.startAgent(cfg)
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	e.exec(e.app, `UPDATE t SET v = 0 WHERE id <= 10`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_dml('public.t', p_repull => true)`), "injected failure")
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued))
	require.Equal(t, 10, queued)
	e.done(`SELECT mimeo.refresh_dml('public.t')`)
	e.requireSame("public.t", "public.t")
	e.exec(e.app, `DELETE FROM t WHERE id > 90`)
	e.done(`SELECT mimeo.refresh_dml('public.t', p_repull => true)`) // the hook fails only once
	e.requireSame("public.t", "public.t")
	// The request ends done with the destination's commit; the source's
	// queue is cleared right after it.
	require.Eventually(t, func() bool {
		return e.src.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.`+queueName(t, e)).Scan(&queued) == nil && queued == 0
	}, 10*time.Second, 20*time.Millisecond, "a repull removes the queue entries its snapshot covers")
}

// A batch is the next entries in row address order, whatever plan the
// source picks for reading them: a parallel scan (made cheap here) returns
// them out of order (the more so without the leader), and a batch that took a range wider than the entries
// it removes would apply entries twice and overrun its limit.
func TestDMLBatchesKeepTheirLimitUnderAParallelScan(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int, pad text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, g, repeat('x', 200) FROM generate_series(1, 4000) g`)
	e.prepareTriggers("public.t")
	e.exec(e.src, `DO $$ BEGIN
    EXECUTE format('ALTER DATABASE %I SET parallel_setup_cost = 0', current_database());
    EXECUTE format('ALTER DATABASE %I SET parallel_tuple_cost = 0', current_database());
    EXECUTE format('ALTER DATABASE %I SET min_parallel_table_scan_size = 0', current_database());
    EXECUTE format('ALTER DATABASE %I SET parallel_leader_participation = off', current_database());
END $$`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	q := "mimeo." + queueName(t, e)
	e.exec(e.src, `ALTER TABLE `+q+` SET (parallel_workers = 2)`)
	// Many queue pages: each update queues one entry per key.
	for i := 0; i < 3; i++ {
		e.exec(e.app, `UPDATE t SET v = v + 1`)
	}
	// What the source would pick for a batch's read, with those settings.
	tx, err := e.src.Begin(e.ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(e.ctx) }()
	var plan string
	require.NoError(t, tx.QueryRow(e.ctx, `SELECT set_config('parallel_setup_cost', '0', true), set_config('parallel_tuple_cost', '0', true),
    set_config('min_parallel_table_scan_size', '0', true)`).Scan(&plan, &plan, &plan))
	rows, err := tx.Query(e.ctx, `EXPLAIN SELECT ctid FROM `+q+` WHERE ctid > '(0,0)' AND mimeo_truncated IS NULL LIMIT 1000`)
	require.NoError(t, err)
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Contains(t, strings.Join(lines, "\n"), "Parallel Seq Scan", "the test needs a parallel plan")
	require.NoError(t, tx.Rollback(e.ctx))

	o := e.done(`SELECT mimeo.refresh_dml('public.t', p_limit => 1000)`)
	require.Contains(t, *o.Message, "replayed 12 batches; 12000 rows written", "each entry applied once, 1000 a batch")
	var queued int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM `+q).Scan(&queued))
	require.Zero(t, queued)
	e.requireSame("public.t", "public.t")
}

// A dml table handed to another role, the agent keeping DML rights, is
// repulled by DELETE (it may not TRUNCATE it), and the repull clears what
// an earlier check found: refresh_status calls the table ok again.
func TestDMLRepullOfATableHandedToAnotherRoleRepairsItsCheck(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, 'v' FROM generate_series(1, 50) g`)
	e.prepareTriggers("public.t")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.t', $1)`, e.dblink)
	su := e.pool(pgtest.Destination().ConnString(e.dstDB, pgtest.Destination().Superuser, ""))
	e.exec(su, `ALTER TABLE public.t OWNER TO `+strangerRole)
	e.exec(su, `GRANT SELECT, INSERT, UPDATE, DELETE ON public.t TO `+agentRole)
	e.exec(su, `DELETE FROM public.t WHERE id <= 5`) // behind the agent's back
	o := e.done(`SELECT mimeo.validate('public.t')`)
	require.Contains(t, fmt.Sprint(deref(o.Message)), "differs")
	health := func() string {
		var h string
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT health FROM mimeo.refresh_status WHERE dest_table = 'public.t'`).Scan(&h))
		return h
	}
	require.Equal(t, "invalid", health())
	e.done(`SELECT mimeo.refresh_dml('public.t', p_repull => true)`)
	e.requireSame("public.t", "public.t")
	require.Equal(t, "ok", health())
	var detail string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT detail FROM mimeo.validation WHERE dest_table = 'public.t' AND NOT ok`).Scan(&detail))
	require.Contains(t, detail, "repaired by the repull of request")
}
