// Package logical is mimeo's logical-decoding engine: one stream per source
// database, reading a permanent slot (pgoutput) for all that source's
// logical tables, applying each source transaction exactly once to the
// destination and acknowledging the slot only up to what the destination
// has committed. The agent starts an Engine; makers, refreshes and
// destroyers (run by the agent as requests) meet the streams through the
// destination's tables.
package logical

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Sources opens connections to the source databases of dblink_mapping.
type Sources interface {
	// Connect opens a read-write session on source dblink.
	Connect(ctx context.Context, dblink int) (*pgx.Conn, error)
	// ReplicationConfig is the configuration of a replication connection
	// (replication=database) to source dblink.
	ReplicationConfig(ctx context.Context, dblink int) (*pgconn.Config, error)
}

// Config tunes the engine.
type Config struct {
	// MemoryBudget bounds the bytes of changes held per stream before they
	// are applied (a larger transaction is applied in pieces inside one
	// destination transaction).
	MemoryBudget int
	// NoStreaming: never ask the source to stream transactions in
	// progress (each is then sent, and applied, once it has committed).
	NoStreaming bool
	// WALWarnBytes: a slot retaining more WAL than this is warned about.
	WALWarnBytes int64
	// StatusInterval is how often the slot is acknowledged.
	StatusInterval time.Duration
	// CheckInterval is how often a stream measures its slot's WAL and
	// compares its tables' partitions with the source's (10 s if 0).
	CheckInterval time.Duration
	// Faults, when set, is called at named points; an error it returns
	// ends the stream there as a crash would. Tests use it.
	Faults func(point string) error
}

// Engine runs one stream per source that has logical tables.
type Engine struct {
	cfg     Config
	dst     *pgxpool.Pool
	sources Sources
	log     hclog.Logger
	metrics *Metrics

	mu       sync.Mutex
	running  map[int]bool
	fellBack map[int]time.Time // when each source's stream last fell back from streaming
	wake     chan struct{}
	progress chan struct{} // closed, and replaced, when a stream has committed more
}

// New returns an engine for the destination pool dst. metrics may be nil.
func New(cfg Config, dst *pgxpool.Pool, sources Sources, log hclog.Logger, metrics *Metrics) *Engine {
	if cfg.MemoryBudget <= 0 {
		cfg.MemoryBudget = 16 << 20
	}
	if cfg.WALWarnBytes <= 0 {
		cfg.WALWarnBytes = 1 << 30
	}
	if cfg.CheckInterval <= 0 {
		cfg.CheckInterval = 10 * time.Second
	}
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = time.Second
	}
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	return &Engine{cfg: cfg, dst: dst, sources: sources, log: log, metrics: metrics, running: map[int]bool{}, fellBack: map[int]time.Time{}, wake: make(chan struct{}, 1),
		progress: make(chan struct{})}
}

// Progress returns a channel that is closed the next time one of this
// engine's streams commits on the destination: an applied position, a
// table made ready or marked failed or needing a resync. A sync point
// takes it before reading mimeo.logical_source, then waits on it (and on a
// timer, for a stream another agent runs) instead of polling fast.
func (e *Engine) Progress() <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.progress
}

// progressed wakes whoever waits on Progress.
func (e *Engine) progressed() {
	e.mu.Lock()
	close(e.progress)
	e.progress = make(chan struct{})
	e.mu.Unlock()
}

// Wake makes Run look for sources to stream now (a maker just made one).
func (e *Engine) Wake() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Run starts and supervises the streams until ctx ends, then waits for
// them to stop.
func (e *Engine) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		ids, err := e.wanted(ctx)
		if err != nil && ctx.Err() == nil {
			e.log.Warn("cannot list the sources of logical tables", "error", err)
		}
		for _, id := range ids {
			e.mu.Lock()
			busy := e.running[id]
			e.running[id] = true
			e.mu.Unlock()
			if busy {
				continue
			}
			wg.Go(func() {
				defer func() { e.mu.Lock(); delete(e.running, id); e.mu.Unlock() }()
				e.runSource(ctx, id)
			})
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-e.wake:
		}
	}
}

// wanted lists the sources with logical tables whose slot can stream, and
// keeps the needs-resync metric of every source true (also in an agent
// that never streamed it).
func (e *Engine) wanted(ctx context.Context) ([]int, error) {
	rows, err := e.dst.Query(ctx, `SELECT s.dblink, s.status = 'needs_resync',
       s.applied_lsn IS NOT NULL AND EXISTS (SELECT 1 FROM ONLY mimeo.refresh_config_logical c WHERE c.dblink = s.dblink)
FROM mimeo.logical_source s ORDER BY 1`)
	if err != nil {
		return nil, err
	}
	var ids []int
	for rows.Next() {
		var id int
		var resync, tables bool
		if err := rows.Scan(&id, &resync, &tables); err != nil {
			rows.Close()
			return nil, err
		}
		gauge := 0.0
		if resync {
			gauge = 1
		}
		e.metrics.resync.WithLabelValues(label(id)).Set(gauge)
		if tables && !resync {
			ids = append(ids, id)
		}
	}
	return ids, rows.Err()
}

// retryMax is the longest pause between a stream's attempts to reconnect:
// a source back from a restart or an outage streams again within it, as
// its tables are to be fresh within about a second.
const retryMax = 5 * time.Second

// runSource streams one source until ctx ends or it has no tables left,
// reconnecting after errors with a growing pause.
func (e *Engine) runSource(ctx context.Context, dblink int) {
	log := e.log.With("source", dblink)
	pause := time.Second
	for ctx.Err() == nil {
		// Kept by the engine: a stream that ends (another agent held the
		// source a moment) must not forget that it fell back.
		e.mu.Lock()
		unstreamedAt := e.fellBack[dblink]
		e.mu.Unlock()
		mayStream := !e.cfg.NoStreaming && (unstreamedAt.IsZero() || time.Since(unstreamedAt) >= unstreamedFor)
		s := &stream{e: e, dblink: dblink, log: log, mayStream: mayStream}
		err := s.run(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, errNoTables), errors.Is(err, errBusy), errors.Is(err, errResync):
			return
		case errors.Is(err, errRestart):
			pause = time.Second
			continue
		case errors.Is(err, errUnstreamed):
			log.Info("logical stream starts again without streaming transactions in progress", "reason", err.Error(),
				"streaming_again_after", unstreamedFor.String())
			e.mu.Lock()
			e.fellBack[dblink] = time.Now()
			e.mu.Unlock()
			e.metrics.unstream.WithLabelValues(label(dblink)).Inc()
			_ = s.fault("fell back from streaming")
			pause = time.Second
			continue
		case err != nil:
			log.Error("logical stream stopped; retrying", "error", err, "retry_in", pause.String())
			s.setStatus(context.WithoutCancel(ctx), "error", err.Error())
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		pause = min(2*pause, retryMax)
	}
}

var (
	errNoTables = errors.New("no logical tables left on this source")
	errBusy     = errors.New("another agent streams this source")
	errResync   = errors.New("the source needs a resync")
	errRestart  = errors.New("stream restarts")
)
