package agent_test

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
)

// streamingEnv is a logical table public.t fed by an agent whose memory
// budget is small, so that a source transaction of a few thousand rows is
// streamed while in progress; it counts the pieces applied and the
// fall-backs to the stream without streaming.
type streamingEnv struct {
	*env
	pieces, fallbacks atomic.Int64
	stop              func()
	metrics           string // the agents' metrics address
}

func setupStreaming(t *testing.T, tables ...string) *streamingEnv {
	t.Helper()
	s := &streamingEnv{env: setupLogical(t), metrics: freeAddr(t)}
	for _, tbl := range append([]string{"public.t"}, tables...) {
		s.exec(s.app, `CREATE TABLE `+tbl+` (id int PRIMARY KEY, v text)`)
	}
	s.stop = s.startAgent(s.streamingConfig())
	for _, tbl := range append([]string{"public.t"}, tables...) {
		s.done(`SELECT mimeo.logical_maker($1, $2)`, tbl, s.dblink)
		// A table still draining its copy's backlog takes no streamed
		// piece (the stream would fall back).
		s.waitState(tbl, "ready")
	}
	return s
}

func (s *streamingEnv) streamingConfig() agent.Config {
	cfg := s.config()
	cfg.LogicalMemory = 64 << 10
	cfg.MetricsAddr = s.metrics
	cfg.LogicalFaults = func(point string) error {
		switch point {
		case "applied a piece":
			s.pieces.Add(1)
		case "fell back from streaming":
			s.fallbacks.Add(1)
		}
		return nil
	}
	return cfg
}

// openBig begins a source transaction that inserts rows ids from..to into
// public.t, and waits until pieces of it are applied (streamed: the
// source has not committed it).
func (s *streamingEnv) openBig(from, to int) pgx.Tx {
	s.t.Helper()
	tx, err := s.app.Begin(s.ctx)
	require.NoError(s.t, err)
	s.t.Cleanup(func() { _ = tx.Rollback(s.ctx) })
	before := s.pieces.Load()
	_, err = tx.Exec(s.ctx, `INSERT INTO public.t SELECT g, md5(g::text) FROM generate_series($1::int, $2::int) g`, from, to)
	require.NoError(s.t, err)
	require.Eventually(s.t, func() bool { return s.pieces.Load() > before }, 20*time.Second, 10*time.Millisecond,
		"no piece of the open transaction was applied: it was not streamed")
	return tx
}

// commitBig runs stmts in tx, commits it, and requires public.t on the
// destination to equal the source's after a sync point.
func (s *streamingEnv) commitBig(tx pgx.Tx, stmts ...string) {
	s.t.Helper()
	for _, q := range stmts {
		_, err := tx.Exec(s.ctx, q)
		require.NoError(s.t, err, q)
	}
	require.NoError(s.t, tx.Commit(s.ctx))
	s.sync("public.t")
	s.requireSame("public.t", "public.t")
}

func TestLogicalStreamsALargeTransactionInProgress(t *testing.T) {
	t.Parallel()
	s := setupStreaming(t)
	tx := s.openBig(1, 20000)
	// Applied in a destination transaction that is not committed yet.
	require.Zero(t, s.count("public.t"))
	s.commitBig(tx, `UPDATE public.t SET v = 'u' WHERE id % 3 = 0`, `DELETE FROM public.t WHERE id % 7 = 0`)
	require.Zero(t, s.fallbacks.Load(), "the stream fell back from streaming")

	// Stopped while one is streamed: nothing of it was committed, and
	// the next agent gets it whole once it commits.
	tx = s.openBig(20001, 40000)
	s.stop()
	_, err := tx.Exec(s.ctx, `UPDATE public.t SET v = 'again' WHERE id % 5 = 0`)
	require.NoError(t, err)
	require.NoError(t, tx.Commit(s.ctx))
	s.startAgent(s.streamingConfig())
	s.sync("public.t")
	s.requireSame("public.t", "public.t")
}

func TestLogicalStreamedTransactionRolledBack(t *testing.T) {
	t.Parallel()
	s := setupStreaming(t)
	s.exec(s.app, `INSERT INTO public.t VALUES (0, 'before')`)
	tx := s.openBig(1, 20000)
	require.NoError(t, tx.Rollback(s.ctx))
	s.exec(s.app, `INSERT INTO public.t VALUES (20001, 'after')`)
	s.sync("public.t")
	s.requireSame("public.t", "public.t")
	require.Equal(t, 2, s.count("public.t"))
	require.Zero(t, s.fallbacks.Load(), "the rollback made the stream fall back")
}

// A subtransaction's rollback cannot be undone in the destination
// transaction: the stream starts again without streaming.
func TestLogicalStreamedTransactionWithASubtransactionRolledBack(t *testing.T) {
	t.Parallel()
	s := setupStreaming(t)
	tx := s.openBig(1, 10000)
	s.commitBig(tx,
		`SAVEPOINT s`,
		`INSERT INTO public.t SELECT g, 'gone' FROM generate_series(10001, 20000) g`,
		`UPDATE public.t SET v = 'gone' WHERE id < 100`,
		`ROLLBACK TO SAVEPOINT s`,
		`INSERT INTO public.t SELECT g, 'kept' FROM generate_series(20001, 25000) g`)
	require.Positive(t, s.fallbacks.Load(), "the stream did not fall back")
	counted := fmt.Sprintf(`mimeo_logical_streaming_fallbacks_total{source="%d"} %d`, s.dblink, s.fallbacks.Load())
	require.Contains(t, scrape(s.metrics), counted)
}

// Other transactions committing while a streamed one is open are applied
// at once (the stream falls back), and the streamed one after its commit.
func TestLogicalStreamedTransactionWhileOthersCommit(t *testing.T) {
	t.Parallel()
	s := setupStreaming(t, "public.other")
	tx := s.openBig(1, 20000)
	s.exec(s.app, `INSERT INTO public.other VALUES (1, 'meanwhile')`)
	s.exec(s.app, `INSERT INTO public.t VALUES (50000, 'meanwhile')`)
	s.sync("public.other")
	s.requireSame("public.other", "public.other")
	s.requireSame("public.t", "public.t") // only the committed row
	s.commitBig(tx, `UPDATE public.t SET v = 'late' WHERE id % 2 = 0`)
	require.Positive(t, s.fallbacks.Load(), "the stream did not fall back")
}

// A streamed transaction left open does not hold a sync point back.
func TestLogicalSyncPointWhileAStreamedTransactionStaysOpen(t *testing.T) {
	t.Parallel()
	s := setupStreaming(t)
	s.exec(s.app, `INSERT INTO public.t VALUES (0, 'committed')`)
	tx := s.openBig(1, 20000)
	s.sync("public.t")
	s.requireSame("public.t", "public.t")
	s.commitBig(tx)
}

// A table made from the same source table while a streamed transaction is
// applied in pieces gets that transaction too (its copy waits for it, or
// the stream falls back and hands it to the table's backlog).
func TestLogicalTableMadeWhileATransactionIsStreamed(t *testing.T) {
	t.Parallel()
	s := setupStreaming(t)
	tx := s.openBig(1, 20000)
	id := s.request(`SELECT mimeo.logical_maker('public.t', $1, 'public.t_copy')`, s.dblink)
	time.Sleep(300 * time.Millisecond) // the maker commits the table's config
	_, err := tx.Exec(s.ctx, `UPDATE public.t SET v = 'u' WHERE id % 3 = 0`)
	require.NoError(t, err)
	require.NoError(t, tx.Commit(s.ctx))
	o := s.await(id)
	require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
	s.sync("public.t")
	s.sync("public.t_copy")
	s.requireSame("public.t", "public.t")
	s.requireSame("public.t", "public.t_copy")
}
