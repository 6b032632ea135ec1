package agent_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
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
		`UPDATE ` + tbl + ` SET "order" = 1000 WHERE "order" = 8`,  // key change
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

// logicalState is a table's logical_state and logical_detail as
// refresh_status shows them.
func (e *env) logicalState(table string) (string, string) {
	e.t.Helper()
	var state, detail *string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT logical_state, logical_detail FROM mimeo.refresh_status WHERE dest_table = $1`, table).Scan(&state, &detail))
	return fmt.Sprint(deref(state)), fmt.Sprint(deref(detail))
}

// waitState polls until the table's logical_state is want.
func (e *env) waitState(table, want string) string {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		state, detail := e.logicalState(table)
		if state == want {
			return detail
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s is %s (%s), not %s", table, state, detail, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// streamedThenStopped makes public.t (100 rows) logical, syncs it, stops
// the agent, and returns the source's slot.
func (e *env) streamedThenStopped() string {
	e.t.Helper()
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, 'v' FROM generate_series(1, 100) g`)
	stop := e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.sync("public.t")
	stop()
	var slot string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT slot_name FROM mimeo.logical_source`).Scan(&slot))
	return slot
}

// resyncReported starts the agent and requires public.t to be marked
// needs_resync, its detail naming why and the repull to run.
func (e *env) resyncReported(why string) {
	e.t.Helper()
	e.startAgent(e.config())
	detail := e.waitState("public.t", "needs_resync")
	require.Contains(e.t, detail, why)
	require.Contains(e.t, detail, "p_repull => true")
}

// repullRepairs requires a plain sync of public.t to be refused, then one
// repull to bring it back: ready, streaming, and equal to the source.
func (e *env) repullRepairs() {
	e.t.Helper()
	msg := e.failed(`SELECT mimeo.refresh_logical('public.t')`)
	require.Contains(e.t, msg, "needs resync")
	e.done(`SELECT mimeo.refresh_logical('public.t', p_repull => true)`)
	e.exec(e.app, `UPDATE public.t SET v = 'after' WHERE id <= 10`)
	e.sync("public.t")
	e.requireSame("public.t", "public.t")
	state, _ := e.logicalState("public.t")
	require.Equal(e.t, "ready", state)
}

func TestLogicalSlotDroppedBehindItsBackIsReportedNotReplaced(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	slot := e.streamedThenStopped()
	e.exec(e.src, `SELECT pg_drop_replication_slot($1)`, slot)
	e.exec(e.app, `INSERT INTO public.t VALUES (101, 'lost to the slot')`)

	e.resyncReported("is missing on the source")
	require.NotContains(t, e.slots(), "slot "+slot, "the slot is not silently re-created")
	e.repullRepairs()
}

func TestLogicalFailingTableDoesNotStopItsSiblings(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.a (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `CREATE TABLE public.b (id int PRIMARY KEY, v text)`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.a', $1)`, e.dblink)
	e.done(`SELECT mimeo.logical_maker('public.b', $1)`, e.dblink)
	e.sync("public.b")
	e.exec(e.dst, `ALTER TABLE public.b ADD CONSTRAINT no_bad CHECK (v <> 'bad')`)
	e.exec(e.app, `BEGIN; INSERT INTO public.a VALUES (1, 'ok'); INSERT INTO public.b VALUES (1, 'bad'); COMMIT`)
	e.exec(e.app, `INSERT INTO public.a VALUES (2, 'ok too')`)
	e.sync("public.a")
	e.requireSame("public.a", "public.a")
	detail := e.waitState("public.b", "failed")
	require.Contains(t, detail, "no_bad")
	msg := e.failed(`SELECT mimeo.refresh_logical('public.b')`)
	require.Contains(t, msg, "no_bad")
	e.exec(e.app, `INSERT INTO public.a VALUES (3, 'still streaming')`)
	e.sync("public.a")
	e.requireSame("public.a", "public.a")

	e.exec(e.dst, `ALTER TABLE public.b DROP CONSTRAINT no_bad`)
	e.done(`SELECT mimeo.refresh_logical('public.b', p_repull => true)`)
	e.exec(e.app, `INSERT INTO public.b VALUES (2, 'fine')`)
	e.sync("public.b")
	e.requireSame("public.b", "public.b")
}

// piecesConfig is an agent config with a logical memory budget of memory
// bytes, and the count of pieces of large transactions it applies.
func (e *env) piecesConfig(memory int) (agent.Config, *atomic.Int64) {
	cfg := e.config()
	cfg.LogicalMemory = memory
	pieces := new(atomic.Int64)
	cfg.LogicalFaults = func(point string) error {
		if point == "applied a piece" {
			pieces.Add(1)
		}
		return nil
	}
	return cfg, pieces
}

func TestLogicalTransactionLargerThanTheMemoryBudget(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	cfg, pieces := e.piecesConfig(64 << 10)
	e.startAgent(cfg)
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.exec(e.app, `BEGIN; INSERT INTO public.t SELECT g, md5(g::text) FROM generate_series(1, 30000) g;
        UPDATE public.t SET v = 'u' WHERE id % 3 = 0; DELETE FROM public.t WHERE id % 7 = 0; COMMIT`)
	e.sync("public.t")
	e.requireSame("public.t", "public.t")
	require.Greater(t, pieces.Load(), int64(10), "the transaction was applied in pieces")
}

// Pieces large enough to be staged (their rows encoded while the piece
// before runs): a plain table, a logdel one and one with a condition take
// inserts, updates, deletes and key changes in one large transaction.
func TestLogicalLargeTransactionInStagedPieces(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	for _, tbl := range []string{"public.t", "public.l", "public.c"} {
		e.exec(e.app, `CREATE TABLE `+tbl+` (id int PRIMARY KEY, v text)`)
		e.exec(e.app, `INSERT INTO `+tbl+` SELECT g, 'old' FROM generate_series(-2000, 0) g`)
	}
	cfg, pieces := e.piecesConfig(1 << 20) // pieces of 256 kB: thousands of rows
	e.startAgent(cfg)
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.done(`SELECT mimeo.logical_maker('public.l', $1, p_logdel => true)`, e.dblink)
	e.done(`SELECT mimeo.logical_maker('public.c', $1, p_condition => 'id % 10 <> 0')`, e.dblink)
	var stmts []string
	for _, tbl := range []string{"public.t", "public.l", "public.c"} {
		stmts = append(stmts,
			`INSERT INTO `+tbl+` SELECT g, md5(g::text) FROM generate_series(1, 20000) g`,
			`UPDATE `+tbl+` SET v = 'u' WHERE id % 3 = 0`,
			`DELETE FROM `+tbl+` WHERE id % 7 = 0`,
			`UPDATE `+tbl+` SET id = id + 100000 WHERE id % 11 = 0`)
	}
	e.exec(e.app, "BEGIN; "+strings.Join(stmts, "; ")+"; COMMIT")
	for _, tbl := range []string{"public.t", "public.l", "public.c"} {
		e.sync(tbl)
	}
	require.Greater(t, pieces.Load(), int64(5), "the transaction was applied in pieces")
	e.requireSame("public.t", "public.t")
	e.requireSame("public.l", "(SELECT id, v FROM public.l WHERE mimeo_source_deleted IS NULL)")
	e.requireSame("(SELECT * FROM public.c WHERE id % 10 <> 0)", "public.c")
	var kept int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM public.l WHERE mimeo_source_deleted IS NOT NULL`).Scan(&kept))
	require.Positive(t, kept, "logdel keeps the deleted rows")
}

// A table that fails in a piece of a large transaction (its statements run
// while the next piece is folded) fails alone, as in a small one.
func TestLogicalTableFailingInALargeTransactionDoesNotStopItsSiblings(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.a (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `CREATE TABLE public.b (id int PRIMARY KEY, v text)`)
	cfg := e.config()
	cfg.LogicalMemory = 64 << 10
	e.startAgent(cfg)
	e.done(`SELECT mimeo.logical_maker('public.a', $1)`, e.dblink)
	e.done(`SELECT mimeo.logical_maker('public.b', $1)`, e.dblink)
	e.sync("public.b")
	e.exec(e.dst, `ALTER TABLE public.b ADD CONSTRAINT no_bad CHECK (v <> 'bad')`)
	// b's bad row comes in the middle, between pieces of a's rows.
	e.exec(e.app, `BEGIN;
        INSERT INTO public.a SELECT g, md5(g::text) FROM generate_series(1, 10000) g;
        INSERT INTO public.b SELECT g, CASE WHEN g = 500 THEN 'bad' ELSE 'ok' END FROM generate_series(1, 1000) g;
        INSERT INTO public.a SELECT g, md5(g::text) FROM generate_series(10001, 20000) g;
        UPDATE public.a SET v = 'u' WHERE id % 3 = 0;
        COMMIT`)
	detail := e.waitState("public.b", "failed")
	require.Contains(t, detail, "no_bad")
	e.sync("public.a")
	e.requireSame("public.a", "public.a")
	e.exec(e.app, `INSERT INTO public.a VALUES (20001, 'still streaming')`)
	e.sync("public.a")
	e.requireSame("public.a", "public.a")
	e.exec(e.dst, `ALTER TABLE public.b DROP CONSTRAINT no_bad`)
	e.done(`SELECT mimeo.refresh_logical('public.b', p_repull => true)`)
	e.sync("public.b")
	e.requireSame("public.b", "public.b")
}

func TestLogicalSourceColumnAdded(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, 'v' FROM generate_series(1, 10) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.exec(e.app, `ALTER TABLE public.t ADD COLUMN extra int`)
	e.exec(e.app, `INSERT INTO public.t VALUES (11, 'new', 42)`)
	e.exec(e.app, `UPDATE public.t SET extra = id WHERE id < 5`)
	e.sync("public.t")
	e.requireSame("public.t", "public.t")

	// A column with a default gave existing rows values the stream lacks.
	e.exec(e.app, `ALTER TABLE public.t ADD COLUMN flag boolean DEFAULT true`)
	e.exec(e.app, `INSERT INTO public.t VALUES (12, 'x', 1, false)`)
	detail := e.waitState("public.t", "failed")
	require.Contains(t, detail, "flag")
	require.Contains(t, detail, "p_repull => true")
	e.done(`SELECT mimeo.refresh_logical('public.t', p_repull => true)`)
	e.exec(e.app, `UPDATE public.t SET flag = NOT flag WHERE id = 1`)
	e.sync("public.t")
	e.requireSame("public.t", "public.t")
}

// TestLogicalSyncPointSeesAColumnTheStreamHasNot: pgoutput describes a
// table only with its next change, so after an ALTER TABLE on an idle table
// the stream knows nothing of it; the sync point must not call the copy
// current when the new column has values its existing rows lack.
func TestLogicalSyncPointSeesAColumnTheStreamHasNot(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, 'v' FROM generate_series(1, 10) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)

	// Without a default the existing rows are NULL on both sides: the
	// stream adds the column with the table's next change.
	e.exec(e.app, `ALTER TABLE public.t ADD COLUMN note text`)
	e.sync("public.t")
	e.exec(e.app, `ALTER TABLE public.t ADD COLUMN "Flag" boolean DEFAULT true`)
	msg := e.failed(`SELECT mimeo.refresh_logical('public.t')`)
	require.Contains(t, msg, `column "Flag" was added on the source with a default`)
	detail := e.waitState("public.t", "failed")
	require.Contains(t, detail, `"Flag"`)
	require.Contains(t, detail, "p_repull => true")

	e.done(`SELECT mimeo.refresh_logical('public.t', p_repull => true)`)
	e.exec(e.app, `UPDATE public.t SET note = 'n' WHERE id = 1`)
	e.sync("public.t")
	e.requireSame("public.t", "public.t")
}

func TestLogicalIdleSlotAdvances(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY)`)
	e.exec(e.app, `CREATE TABLE public.other (id int, pad text)`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.sync("public.t")
	var slot string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT slot_name FROM mimeo.logical_source`).Scan(&slot))
	// The rest of the source writes; the slot's table is idle.
	e.exec(e.app, `INSERT INTO public.other SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g`)
	var target string
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&target))
	deadline := time.Now().Add(20 * time.Second)
	for {
		var moved bool
		require.NoError(t, e.src.QueryRow(e.ctx, `SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`, slot, target).Scan(&moved))
		if moved {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the idle slot was not acknowledged past the other table's writes")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The WAL the slot retains is measured and shown.
	deadline = time.Now().Add(20 * time.Second)
	for {
		var kept *int64
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT retained_wal_bytes FROM mimeo.refresh_status WHERE dest_table = 'public.t'`).Scan(&kept))
		if kept != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("retained_wal_bytes is not measured")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// An agent stopped right after a sync point leaves the slot acknowledged
// up to what the destination applied: else the next walsender decodes
// that WAL again, and the source keeps it meanwhile.
func TestLogicalStoppedAgentLeavesTheSlotAcknowledged(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	stop := e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.sync("public.t")
	time.Sleep(1500 * time.Millisecond) // past the periodic acknowledgement
	e.exec(e.app, `INSERT INTO public.t SELECT g, md5(g::text) FROM generate_series(1, 5000) g`)
	e.sync("public.t")
	stop()
	var slot, applied string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT slot_name, applied_lsn::text FROM mimeo.logical_source`).Scan(&slot, &applied))
	deadline := time.Now().Add(10 * time.Second)
	for {
		var active, acked bool
		require.NoError(t, e.src.QueryRow(e.ctx, `SELECT active, confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`,
			slot, applied).Scan(&active, &acked))
		if !active {
			require.True(t, acked, "slot %s was left behind applied_lsn %s", slot, applied)
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the stopped agent's walsender is still active")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var agentBin struct {
	once sync.Once
	path string
	err  error
}

// agentProcess starts mimeo-agent run (built once per test binary) as a
// process of its own, to be killed.
func (e *env) agentProcess(logName string) *exec.Cmd {
	e.t.Helper()
	agentBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "mimeo-agent-bin")
		if err != nil {
			agentBin.err = err
			return
		}
		agentBin.path = filepath.Join(dir, "mimeo-agent")
		out, err := exec.Command("go", "build", "-o", agentBin.path, "github.com/mimeo-dev/mimeo/cmd/mimeo-agent").CombinedOutput()
		if err != nil {
			agentBin.err = fmt.Errorf("%w: %s", err, out)
		}
	})
	require.NoError(e.t, agentBin.err)
	cmd := exec.Command(agentBin.path, "run")
	cmd.Env = append(os.Environ(), "MIMEO_DATABASE_URL="+e.config().DatabaseURL, "MIMEO_POLL_INTERVAL=200ms",
		"MIMEO_HEARTBEAT_INTERVAL=200ms", "MIMEO_AGENT_TIMEOUT=3s", "MIMEO_LOG_LEVEL=debug")
	logFile, err := os.OpenFile(filepath.Join(os.TempDir(), logName), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	require.NoError(e.t, err)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	require.NoError(e.t, cmd.Start())
	e.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); _ = logFile.Close() })
	return cmd
}

// kill -9 of the agent at random moments of a continuous multi-table
// workload loses and doubles nothing.
func TestLogicalSurvivesKillNine(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	tables := []string{"public.k1", `public."K 2"`, "public.k3"}
	for _, tbl := range tables {
		e.exec(e.app, `CREATE TABLE `+tbl+` (id int PRIMARY KEY, n int NOT NULL, v text)`)
		e.exec(e.app, `INSERT INTO `+tbl+` SELECT g, 0, 'v' FROM generate_series(1, 2000) g`)
	}
	e.exec(e.app, `ALTER TABLE public.k3 ALTER COLUMN v SET STORAGE EXTERNAL`)
	cmd := e.agentProcess("mimeo-logical-kill.log")
	for _, tbl := range tables {
		o := e.await(e.request(`SELECT mimeo.logical_maker($1, $2, p_logdel => $3)`, tbl, e.dblink, tbl == "public.k1"))
		require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				tbl := tables[rng.IntN(len(tables))]
				id := rng.IntN(3000) + 1
				var q string
				switch rng.IntN(6) {
				case 0:
					q = `INSERT INTO ` + tbl + ` VALUES ($1, 0, repeat('t', 3000)) ON CONFLICT (id) DO NOTHING`
				case 1:
					q = `DELETE FROM ` + tbl + ` WHERE id = $1`
				case 2:
					q = `UPDATE ` + tbl + ` SET id = id + 5000 WHERE id = $1` // key change
				case 3:
					q = `UPDATE ` + tbl + ` SET n = n + 1, v = v || 'x' WHERE id BETWEEN $1 AND $1 + 20`
				default:
					q = `UPDATE ` + tbl + ` SET n = n + 1 WHERE id = $1` // TOAST unchanged
				}
				_, _ = e.app.Exec(e.ctx, q, id)
			}
		})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		time.Sleep(time.Duration(300+rng.IntN(1200)) * time.Millisecond)
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
		cmd = e.agentProcess("mimeo-logical-kill.log")
	}
	close(stop)
	wg.Wait()
	for _, tbl := range tables {
		o := e.await(e.request(`SELECT mimeo.refresh_logical($1)`, tbl))
		require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
	}
	for _, tbl := range []string{`public."K 2"`, "public.k3"} {
		e.requireSame(tbl, tbl)
	}
	require.Equal(t, checksum(t, e.ctx, e.src, "public.k1"),
		checksum(t, e.ctx, e.dst, "(SELECT id, n, v FROM public.k1 WHERE mimeo_source_deleted IS NULL)"))
}

func TestLogicalLeastPrivilegeFollowsTheHints(t *testing.T) {
	t.Parallel()
	e := setup(t)
	role := "mimeo_logical_min"
	e.exec(e.src, `DO $$ BEGIN CREATE ROLE `+role+` LOGIN REPLICATION PASSWORD 'min pw'; EXCEPTION WHEN duplicate_object THEN NULL; END $$`)
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET username = $1, pwd = 'min pw' WHERE data_source_id = $2`, role, e.dblink)
	e.exec(e.app, `CREATE TABLE public.orders (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.orders SELECT g, 'v' FROM generate_series(1, 50) g`)
	e.exec(e.app, `GRANT SELECT ON public.orders TO `+role)
	e.startAgent(e.config())
	// The CALL form raises the SQL to run as the error's HINT field.
	_, err := e.dst.Exec(e.ctx, `CALL mimeo.logical_maker_wait('public.orders', $1)`, e.dblink)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.NotContains(t, pgErr.Message, "HINT")
	require.Contains(t, pgErr.Message, "may not create publication")
	_, hint, ok := strings.Cut(pgErr.Hint, "as a superuser on the source run: ")
	require.True(t, ok, pgErr.Hint)
	hint, then, _ := strings.Cut(hint, "; then")
	require.Contains(t, hint, "CREATE PUBLICATION")
	require.Contains(t, then, "call the maker")
	e.exec(e.src, hint)
	e.done(`SELECT mimeo.logical_maker('public.orders', $1)`, e.dblink)
	e.exec(e.app, `UPDATE public.orders SET v = 'app' WHERE id < 10`)
	e.sync("public.orders")
	e.requireSame("public.orders", "public.orders")

	// A second table: the publication exists, adding to it needs the owner.
	e.exec(e.app, `CREATE TABLE public.items (id int PRIMARY KEY)`)
	e.exec(e.app, `GRANT SELECT ON public.items TO `+role)
	msg := e.failed(`SELECT mimeo.logical_maker('public.items', $1)`, e.dblink)
	_, hint, ok = strings.Cut(msg, "as a superuser on the source run: ")
	require.True(t, ok, msg)
	hint, _, _ = strings.Cut(hint, "; then")
	e.exec(e.src, hint)
	e.done(`SELECT mimeo.logical_maker('public.items', $1)`, e.dblink)
	e.exec(e.app, `INSERT INTO public.items VALUES (1)`)
	e.sync("public.items")
	e.requireSame("public.items", "public.items")

	e.done(`SELECT mimeo.logical_destroyer('public.items')`)
	e.done(`SELECT mimeo.logical_destroyer('public.orders')`)
	require.Empty(t, e.slots())
}

func TestLogicalPartitionedSourceAndConditions(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.ev (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)`)
	e.exec(e.app, `CREATE TABLE public.ev_eu PARTITION OF public.ev FOR VALUES IN ('eu')`)
	e.exec(e.app, `CREATE TABLE public.ev_us PARTITION OF public.ev FOR VALUES IN ('us')`)
	e.exec(e.app, `INSERT INTO public.ev SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' || g FROM generate_series(1, 200) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.ev', $1)`, e.dblink)
	// A second copy of the same table, with a condition and a filter.
	e.done(`SELECT mimeo.logical_maker('public.ev', $1, p_dest_table => 'public.ev_small', p_condition => 'id <= 100', p_filter => '{id,region}')`, e.dblink)
	e.exec(e.app, `UPDATE public.ev SET region = 'us' WHERE id BETWEEN 10 AND 20 AND region = 'eu'`) // moves between partitions
	e.exec(e.app, `UPDATE public.ev SET id = id + 1000 WHERE id BETWEEN 90 AND 95`)                  // out of the condition
	e.exec(e.app, `UPDATE public.ev SET id = id - 1200 WHERE id BETWEEN 150 AND 155`)                // into it
	e.exec(e.app, `DELETE FROM public.ev_us WHERE id > 190`)                                         // on a partition directly
	e.sync("public.ev")
	e.sync("public.ev_small")
	e.requireSame("public.ev", "public.ev")
	e.requireSame("(SELECT id, region FROM public.ev WHERE id <= 100)", "public.ev_small")

	// Attaching a partition moves rows in without changes: the table fails
	// (it does not silently lack them), and a repull repairs it.
	e.exec(e.app, `CREATE TABLE public.ev_asia (id int NOT NULL, region text NOT NULL, v text)`)
	e.exec(e.app, `INSERT INTO public.ev_asia VALUES (1000, 'asia', 'a')`)
	e.exec(e.app, `ALTER TABLE public.ev ATTACH PARTITION public.ev_asia FOR VALUES IN ('asia')`)
	detail := e.waitState("public.ev", "failed")
	require.Contains(t, detail, "ev_asia")
	e.done(`SELECT mimeo.refresh_logical('public.ev', p_repull => true)`)
	e.done(`SELECT mimeo.refresh_logical('public.ev_small', p_repull => true)`)
	e.exec(e.app, `INSERT INTO public.ev VALUES (1001, 'asia', 'b')`)
	e.sync("public.ev")
	e.requireSame("public.ev", "public.ev")

	// A partition created as one gets its rows through the table: it is
	// recorded, and the table goes on (a row right after the CREATE too).
	e.exec(e.app, `CREATE TABLE public.ev_apac PARTITION OF public.ev FOR VALUES IN ('apac')`)
	e.exec(e.app, `INSERT INTO public.ev VALUES (2000, 'apac', 'c')`)
	e.waitPartitionsRecorded("public.ev", "public.ev_apac")
	state, detail := e.logicalState("public.ev")
	require.Equal(t, "ready", state, detail)
	e.sync("public.ev")
	e.requireSame("public.ev", "public.ev")

	// A rewrite gives a partition a new file, as a TRUNCATE does: the table
	// is compared with the source, found equal, and goes on.
	e.exec(e.app, `VACUUM FULL public.ev_eu`)
	o := e.awaitAutoValidate("public.ev", "public.ev_eu")
	require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
	require.Contains(t, fmt.Sprint(deref(o.Message)), "ok: checked because partitions [public.ev_eu]")
	state, detail = e.logicalState("public.ev")
	require.Equal(t, "ready", state, detail)

	// pgoutput does not send a TRUNCATE of one partition: the comparison
	// finds the rows the copy kept, and the table fails until a repull.
	e.exec(e.app, `TRUNCATE public.ev_us`)
	e.awaitAutoValidate("public.ev", "public.ev_us")
	detail = e.waitState("public.ev", "failed")
	require.Contains(t, detail, "public.ev_us")
	require.Contains(t, detail, "differ")
	// The same with p_filter: its check compares the copied columns.
	detail = e.waitState("public.ev_small", "failed")
	require.Contains(t, detail, "public.ev_us")
	e.done(`SELECT mimeo.check_source_columns()`)
	var columnsOK bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT ok FROM mimeo.validation WHERE dest_table = 'public.ev_small' AND kind = 'columns'
ORDER BY id DESC LIMIT 1`).Scan(&columnsOK))
	require.True(t, columnsOK, "check_source_columns compares a p_filter copy's own columns")
	var health string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT health FROM mimeo.refresh_status WHERE dest_table = 'public.ev'`).Scan(&health))
	require.Equal(t, "failing", health)
	e.done(`SELECT mimeo.refresh_logical('public.ev', p_repull => true)`)
	e.sync("public.ev")
	e.requireSame("public.ev", "public.ev")
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT health FROM mimeo.refresh_status WHERE dest_table = 'public.ev'`).Scan(&health))
	require.Equal(t, "ok", health, "the repull repaired what the check found")

	// pg_partman's way, with rows written before the ATTACH: they are not
	// in the stream, and the check of the new partition finds them.
	e.exec(e.app, `BEGIN;
        CREATE TABLE public.ev_latam (LIKE public.ev);
        INSERT INTO public.ev_latam VALUES (3000, 'latam', 'before the attach');
        ALTER TABLE public.ev ATTACH PARTITION public.ev_latam FOR VALUES IN ('latam');
        COMMIT`)
	detail = e.waitState("public.ev", "failed")
	require.Contains(t, detail, "public.ev_latam")
}

// waitPartitionsRecorded polls until the stream's check has recorded the
// partition as one of the table's.
func (e *env) waitPartitionsRecorded(table, partition string) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var has bool
		require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT $2 = ANY (partitions) FROM mimeo.refresh_config_logical WHERE dest_table = $1`,
			table, partition).Scan(&has))
		if has {
			return
		}
		if time.Now().After(deadline) {
			state, detail := e.logicalState(table)
			e.t.Fatalf("%s's partitions do not have %s (%s: %s)", table, partition, state, detail)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// awaitAutoValidate waits for the validate request the stream queued for
// table because of partition, and for it to end.
func (e *env) awaitAutoValidate(table, partition string) outcome {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var id *int64
		require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT (SELECT id FROM mimeo.request WHERE action = 'validate' AND dest_table = $1
  AND strpos(args->>'reason', $2) > 0 ORDER BY id LIMIT 1)`, table, partition).Scan(&id))
		if id != nil {
			return e.await(*id)
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("no validate request queued for %s's partition %s", table, partition)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestLogicalBadInput(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public."Weird Name; DROP TABLE x" (id int PRIMARY KEY, "Value" text)`)
	e.exec(e.app, `CREATE TABLE public.keyed (id int PRIMARY KEY, code text NOT NULL UNIQUE)`)
	e.startAgent(e.config())
	_, err := e.dst.Exec(e.ctx, `SELECT mimeo.logical_maker('public.t', 999)`)
	require.ErrorContains(t, err, "999")
	_, err = e.dst.Exec(e.ctx, `SELECT mimeo.refresh_logical('public.nothing')`)
	require.ErrorContains(t, err, "not a replicated table")
	require.Contains(t, e.failed(`SELECT mimeo.logical_maker('public.missing', $1)`, e.dblink), "missing")
	require.Contains(t, e.failed(`SELECT mimeo.logical_maker('public.keyed', $1, p_pk_field => '{code}', p_pk_type => '{text}')`, e.dblink),
		"must be the replica identity")
	require.Contains(t, e.failed(`SELECT mimeo.logical_maker('public.keyed', $1, p_filter => '{code}')`, e.dblink), "key")
	tbl := `public."Weird Name; DROP TABLE x"`
	e.done(`SELECT mimeo.logical_maker($1, $2)`, tbl, e.dblink)
	e.exec(e.app, `INSERT INTO `+tbl+` VALUES (1, 'it''s')`)
	e.sync(tbl)
	e.requireSame(tbl, tbl)
}

// A row that an UPDATE leaving a TOASTed value unchanged brings into the
// condition is copied whole.
func TestLogicalConditionWithUnchangedToast(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.doc (id int PRIMARY KEY, status text, body text)`)
	e.exec(e.app, `ALTER TABLE public.doc ALTER COLUMN body SET STORAGE EXTERNAL`)
	e.exec(e.app, `INSERT INTO public.doc SELECT g, 'draft', repeat(md5(g::text), 100) FROM generate_series(1, 20) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.doc', $1, p_condition => 'status = ''published''')`, e.dblink)
	e.exec(e.app, `UPDATE public.doc SET status = 'published' WHERE id <= 5`) // body unchanged: not sent
	e.exec(e.app, `UPDATE public.doc SET status = 'draft' WHERE id = 1`)      // and out again
	e.sync("public.doc")
	e.requireSame(`(SELECT * FROM public.doc WHERE status = 'published')`, "public.doc")
}

// A slot moved past what the destination applied, or a source that is
// another cluster than the slot's, is reported, never streamed from.
func TestLogicalSlotMovedOrSourceReplacedIsReported(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY)`)
	stop := e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.sync("public.t")
	stop()
	var slot string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT slot_name FROM mimeo.logical_source`).Scan(&slot))
	// Flushed, so the slot can be advanced past it.
	e.exec(e.src, `BEGIN; SET LOCAL synchronous_commit = on; INSERT INTO public.t VALUES (1); COMMIT`)
	e.exec(e.src, `SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())`, slot)
	stop = e.startAgent(e.config())
	detail := e.waitState("public.t", "needs_resync")
	require.Contains(t, detail, "was advanced to")
	e.done(`SELECT mimeo.refresh_logical('public.t', p_repull => true)`)
	e.sync("public.t")
	e.requireSame("public.t", "public.t")
	stop()

	e.exec(e.dst, `UPDATE mimeo.logical_source SET system_identifier = '42'`)
	e.startAgent(e.config())
	detail = e.waitState("public.t", "needs_resync")
	require.Contains(t, detail, "system identifier")
	var status string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT status FROM mimeo.logical_source`).Scan(&status))
	require.Equal(t, "needs_resync", status)
}

// The sync point covers a commit whose WAL the source has not flushed yet
// (synchronous_commit = off, as on the test servers).
func TestLogicalSyncPointRightAfterACommit(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY)`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	for i := range 15 {
		e.exec(e.app, `INSERT INTO public.t VALUES ($1)`, i)
		e.sync("public.t")
		var n int
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM public.t WHERE id = $1`, i).Scan(&n))
		require.Equal(t, 1, n, "row %d committed before the sync point", i)
	}
}

// A logdel repull keeps the history: rows the source lost meanwhile are
// marked deleted, not dropped.
func TestLogicalLogdelRepullKeepsHistory(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.t SELECT g, 'v' FROM generate_series(1, 50) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1, p_logdel => true)`, e.dblink)
	e.exec(e.app, `DELETE FROM public.t WHERE id = 50`)
	e.sync("public.t")
	e.exec(e.dst, `UPDATE mimeo.refresh_config_logical SET state = 'failed', state_detail = 'test'`)
	e.exec(e.app, `DELETE FROM public.t WHERE id <= 10`)
	e.exec(e.app, `INSERT INTO public.t VALUES (50, 'back')`)
	e.done(`SELECT mimeo.refresh_logical('public.t', p_repull => true)`)
	var live, dead int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FILTER (WHERE mimeo_source_deleted IS NULL), count(*) FILTER (WHERE mimeo_source_deleted IS NOT NULL) FROM public.t`).Scan(&live, &dead))
	require.Equal(t, 40, live)
	require.Equal(t, 10, dead, "the rows deleted while the table was stopped stay, marked")
	require.Equal(t, checksum(t, e.ctx, e.src, "public.t"),
		checksum(t, e.ctx, e.dst, "(SELECT id, v FROM public.t WHERE mimeo_source_deleted IS NULL)"))
}

// A condition on a column p_filter leaves out still decides, also for
// UPDATEs that leave TOASTed values unchanged.
func TestLogicalConditionOnAColumnNotCopied(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.doc (id int PRIMARY KEY, status text, n int, body text)`)
	e.exec(e.app, `ALTER TABLE public.doc ALTER COLUMN body SET STORAGE EXTERNAL`)
	e.exec(e.app, `INSERT INTO public.doc SELECT g, CASE WHEN g % 2 = 0 THEN 'on' ELSE 'off' END, 0, repeat(md5(g::text), 100) FROM generate_series(1, 20) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.doc', $1, p_filter => '{id,n,body}', p_condition => 'status = ''on''')`, e.dblink)
	e.exec(e.app, `UPDATE public.doc SET n = n + 1 WHERE id <= 6`)           // in and out of the condition alike
	e.exec(e.app, `UPDATE public.doc SET status = 'on' WHERE id IN (1, 3)`)  // into it, body unchanged
	e.exec(e.app, `UPDATE public.doc SET status = 'off' WHERE id IN (2, 4)`) // out of it
	e.exec(e.app, `UPDATE public.doc SET id = id + 100 WHERE id IN (6, 7)`)  // key changes
	e.sync("public.doc")
	e.requireSame(`(SELECT id, n, body FROM public.doc WHERE status = 'on')`, "public.doc")
	state, _ := e.logicalState("public.doc")
	require.Equal(t, "ready", state)
}

// A destination table handed to another role, the agent keeping DML
// rights, streams and repulls.
func TestLogicalTableHandedToAnotherRole(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.acc (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `INSERT INTO public.acc SELECT g, 'v' FROM generate_series(1, 20) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.acc', $1)`, e.dblink)
	su := e.pool(pgtest.Destination().ConnString(e.dstDB, pgtest.Destination().Superuser, ""))
	// A role of this test's own: the agent's role is made a member of it.
	const accOwner = "acc_owner"
	require.NoError(t, pgtest.CreateRole(e.ctx, pgtest.Destination(), accOwner, "", "NOLOGIN"))
	e.exec(su, `REVOKE `+accOwner+` FROM `+agentRole) // from an earlier run (-count)
	e.exec(su, `ALTER TABLE public.acc OWNER TO `+accOwner)
	e.exec(su, `GRANT SELECT, INSERT, UPDATE, DELETE ON public.acc TO `+agentRole)
	e.exec(e.app, `UPDATE public.acc SET v = 'x' WHERE id < 5`)
	e.exec(e.app, `TRUNCATE public.acc`)
	e.exec(e.app, `INSERT INTO public.acc VALUES (1, 'after')`)
	e.sync("public.acc")
	e.requireSame("public.acc", "public.acc")
	e.done(`SELECT mimeo.refresh_logical('public.acc', p_repull => true)`)
	e.requireSame("public.acc", "public.acc")

	// Adding a column needs the owner's rights: the stream's failure and the
	// repull's say which grant gives them, and with it the repull works.
	e.exec(e.app, `ALTER TABLE public.acc ADD COLUMN w int`)
	e.exec(e.app, `INSERT INTO public.acc VALUES (2, 'w', 7)`)
	detail := e.waitState("public.acc", "failed")
	grant := "GRANT " + accOwner + " TO " + agentRole
	require.Contains(t, detail, grant)
	e.exec(e.app, `ALTER TABLE public.acc ADD COLUMN d int DEFAULT 5`)
	require.Contains(t, e.failed(`SELECT mimeo.refresh_logical('public.acc', p_repull => true)`), grant)
	e.exec(su, grant)
	e.done(`SELECT mimeo.refresh_logical('public.acc', p_repull => true)`)
	e.exec(e.app, `INSERT INTO public.acc VALUES (3, 'd', 8)`)
	e.sync("public.acc")
	e.requireSame("public.acc", "public.acc")
	var owner string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'acc'`).Scan(&owner))
	require.Equal(t, accOwner, owner)
}

// Transactions of thousands of rows travel through staging tables (COPY),
// in several pieces that reuse them: every statement kind, values COPY's
// text format must escape, unchanged TOAST, key changes, logdel marks and
// a condition must come out as the source has them. (public.some is also
// a keyword-named table: format's %I quotes it, ident's String does not.)
func TestLogicalStagedBatches(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	odd := `public."Odd ""Staged"" Rows"`
	e.exec(e.app, `CREATE TABLE `+odd+` ("k 1" int, "K2" text, v text, big text, PRIMARY KEY ("k 1", "K2"))`)
	e.exec(e.app, `ALTER TABLE `+odd+` ALTER COLUMN big SET STORAGE EXTERNAL`)
	e.exec(e.app, `CREATE TABLE public.kept (id int PRIMARY KEY, v text)`)
	e.exec(e.app, `CREATE TABLE public.some (id int PRIMARY KEY, status text, body text)`)
	e.exec(e.app, `ALTER TABLE public.some ALTER COLUMN body SET STORAGE EXTERNAL`)
	e.exec(e.app, `INSERT INTO public.some SELECT g, 'draft', repeat(md5(g::text), 100) FROM generate_series(1, 3000) g`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker($1, $2)`, odd, e.dblink)
	e.done(`SELECT mimeo.logical_maker('public.kept', $1, p_logdel => true)`, e.dblink)
	e.done(`SELECT mimeo.logical_maker('public.some', $1, p_condition => 'status = ''published''')`, e.dblink)

	// Values with every character COPY escapes, NULLs, and TOAST.
	e.exec(e.app, `INSERT INTO `+odd+` SELECT g, E'k\\' || (g % 3), CASE WHEN g % 5 = 0 THEN NULL ELSE E'tab\there\nnew\rline\\back' || g END,
        CASE WHEN g % 100 = 0 THEN repeat(md5(g::text), 100) END FROM generate_series(1, 20000) g`)
	e.exec(e.app, `INSERT INTO public.kept SELECT g, 'v' || g FROM generate_series(1, 5000) g`)
	e.sync(odd)
	e.requireSame(odd, odd)

	e.exec(e.app, `BEGIN;
        UPDATE `+odd+` SET v = E'\\N not null' WHERE "k 1" % 2 = 0;
        UPDATE `+odd+` SET v = 'toast kept' WHERE big IS NOT NULL;
        UPDATE `+odd+` SET "k 1" = "k 1" + 100000 WHERE "k 1" % 7 = 0 AND big IS NULL;
        DELETE FROM `+odd+` WHERE "k 1" % 11 = 0;
        DELETE FROM public.kept WHERE id % 2 = 0;
        UPDATE public.some SET status = 'published' WHERE id <= 2500;
        UPDATE public.some SET status = 'draft' WHERE id <= 1000;
        COMMIT`)
	for _, table := range []string{odd, "public.kept", "public.some"} {
		e.sync(table)
	}
	e.requireSame(odd, odd)
	var kept int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM `+odd+` WHERE v = 'toast kept' AND length(big) = 3200`).Scan(&kept))
	require.Positive(t, kept)
	e.requireSame(`(SELECT * FROM public.kept)`, `(SELECT id, v FROM public.kept WHERE mimeo_source_deleted IS NULL)`)
	var marked int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM public.kept WHERE mimeo_source_deleted IS NOT NULL`).Scan(&marked))
	require.Equal(t, 2500, marked)
	e.requireSame(`(SELECT * FROM public.some WHERE status = 'published')`, "public.some")
}

// A destination where the agent may not make temporary tables still gets
// large transactions, as array parameters.
func TestLogicalStagingWithoutTempRight(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.dst, `DO $$ BEGIN EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC, CURRENT_USER', current_database()); END $$`)
	var temp bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT has_database_privilege(current_database(), 'TEMP')`).Scan(&temp))
	require.False(t, temp)
	e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v text)`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.t', $1)`, e.dblink)
	e.exec(e.app, `BEGIN; INSERT INTO public.t SELECT g, md5(g::text) FROM generate_series(1, 5000) g;
        UPDATE public.t SET v = 'u' WHERE id % 3 = 0; DELETE FROM public.t WHERE id % 4 = 0; COMMIT`)
	e.sync("public.t")
	e.requireSame("public.t", "public.t")
}

// TestLogicalUniqueValuesSwapped: the source may swap unique values
// between rows through a temporary one; the stream applies a batch
// set-based, so its copy of the unique index is a DEFERRABLE constraint
// checked at the batch's end (a statement's end is not enough: a row whose
// TOASTed value was left unchanged is updated by a statement of its own),
// and a real duplicate still fails the table.
func TestLogicalUniqueValuesSwapped(t *testing.T) {
	t.Parallel()
	e := setupLogical(t)
	e.exec(e.app, `CREATE TABLE public.uq (id int PRIMARY KEY, email text UNIQUE, v int, big text)`)
	e.exec(e.app, `INSERT INTO public.uq SELECT g, 'e' || g, g FROM generate_series(1, 100) g`)
	e.exec(e.app, `UPDATE public.uq SET big = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 3000) g) WHERE id = 31`)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.logical_maker('public.uq', $1)`, e.dblink)
	var deferrable bool
	require.NoError(t, e.dst.QueryRow(t.Context(), `SELECT condeferrable FROM pg_constraint
WHERE conrelid = 'public.uq'::regclass AND contype = 'u'`).Scan(&deferrable))
	require.True(t, deferrable)

	// In one transaction, and in three sent back to back (one batch).
	e.exec(e.app, `BEGIN; UPDATE public.uq SET email = 'tmp' WHERE id = 11; UPDATE public.uq SET email = 'e11' WHERE id = 12;
UPDATE public.uq SET email = 'e12' WHERE id = 11; COMMIT`)
	e.exec(e.app, `UPDATE public.uq SET email = 'tmp' WHERE id = 21`)
	e.exec(e.app, `UPDATE public.uq SET email = 'e21' WHERE id = 22`)
	e.exec(e.app, `UPDATE public.uq SET email = 'e22' WHERE id = 21`)
	// Row 31 keeps its TOASTed value, so its changes come without it and
	// are applied by a statement of their own, after row 32's.
	e.exec(e.app, `BEGIN; UPDATE public.uq SET email = 'tmp' WHERE id = 31; UPDATE public.uq SET email = 'e31' WHERE id = 32;
UPDATE public.uq SET email = 'e32' WHERE id = 31; COMMIT`)
	e.sync("public.uq")
	state, detail := e.logicalState("public.uq")
	require.Equal(t, "ready", state, detail)
	e.requireSame("public.uq", "public.uq")

	e.exec(e.dst, `INSERT INTO public.uq VALUES (1000, 'taken', 0)`)
	e.exec(e.app, `INSERT INTO public.uq VALUES (101, 'taken', 0)`)
	detail = e.waitState("public.uq", "failed")
	require.Contains(t, detail, "uq_email_key")
}
