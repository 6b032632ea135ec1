// Package agent is mimeo's engine: it claims requests from the destination's
// queue, runs them (one file per replication type) under a per-table lock,
// and records their outcome, job log and its own heartbeat.
package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/logical"
	"github.com/mimeo-dev/mimeo/queue"
)

// Version is mimeo-agent's version; it installs schema version mimeosql.Version.
const Version = "0.8.0"

// Agent serves one destination database.
type Agent struct {
	cfg      Config
	log      hclog.Logger
	pool     *pgxpool.Pool
	sources  *sources
	handlers map[string]handler
	metrics  *metrics
	logical  *logical.Engine
	id       atomic.Int64 // row in mimeo.agent, set by register

	// jobCtx is the parent of every running job. It outlives Run's ctx by
	// the shutdown timeout, so jobs can finish after SIGTERM.
	jobCtx    context.Context
	cancelJob context.CancelFunc
	stopping  chan struct{}
	stopOnce  sync.Once

	// stopRun ends Run early, with its cause (ErrSchemaChanged); nil
	// outside Run.
	stopRun    context.CancelCauseFunc
	schemaOnce sync.Once

	// Where housekeeping's passes over runs that moved nothing got to
	// (its goroutine only).
	noopRequests, noopJobs int64
}

// New connects to the destination and checks its mimeo schema. logger may
// be nil.
func New(ctx context.Context, cfg Config, logger hclog.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	pcfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("MIMEO_DATABASE_URL: %w", err)
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = "mimeo-agent"
	// Each worker holds one connection for its run (and its table lock)
	// and briefly a second for the job log; a few more for the producer.
	pcfg.MaxConns = int32(2*cfg.Workers + 4)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect to destination: %w", err)
	}
	a := &Agent{cfg: cfg, log: logger, pool: pool, sources: newSources(cfg, logger.Named("source")), stopping: make(chan struct{}), metrics: newMetrics()}
	a.metrics.registry.MustRegister(&tableCollector{pool: pool, timeout: cfg.AgentTimeout})
	a.jobCtx, a.cancelJob = context.WithCancel(context.WithoutCancel(ctx))
	a.handlers = a.registerHandlers()
	a.logical = logical.New(logical.Config{MemoryBudget: cfg.LogicalMemory, NoStreaming: !cfg.LogicalStreaming, WALWarnBytes: cfg.LogicalWALWarning,
		CheckInterval: cfg.LogicalCheckInterval, Faults: cfg.LogicalFaults},
		pool, logicalSources{a}, logger.Named("logical"), logical.NewMetrics(a.metrics.registry))
	if err := a.checkSchema(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return a, nil
}

// Close releases the agent's connections.
func (a *Agent) Close() {
	a.cancelJob()
	a.sources.close()
	a.pool.Close()
}

// Pool is the destination pool (for the CLI's status and install commands).
func (a *Agent) Pool() *pgxpool.Pool { return a.pool }

// Run serves the queue until ctx ends: it LISTENs and polls, claims
// requests for its workers, keeps its heartbeat and recovers requests of
// dead agents. On ctx's end it stops claiming, lets running jobs finish
// within Config.ShutdownTimeout, then cancels (and rolls back) the rest,
// handing their requests back to the queue. It returns an error wrapping
// ErrSchemaChanged when the schema was upgraded (or replaced) under it.
func (a *Agent) Run(parent context.Context) error {
	ctx, stopRun := context.WithCancelCause(parent)
	defer stopRun(nil)
	a.stopRun = stopRun
	listener := queue.NewListener(a.connectDedicated, a.log.Named("listen"))
	// The liveness lock lives on the listener's session: if this process
	// dies, the lock goes with its connection and other agents recover its
	// requests at once.
	registered := make(chan error, 1)
	listener.OnConnect = func(ctx context.Context, conn *pgx.Conn) error {
		err := a.register(ctx, conn)
		select {
		case registered <- err:
		default:
		}
		return err
	}
	var bg sync.WaitGroup
	bgCtx, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBG()
	if a.cfg.MetricsAddr != "" {
		if err := a.serveMetrics(bgCtx, a.cfg.MetricsAddr); err != nil {
			return fmt.Errorf("serve metrics on %s: %w", a.cfg.MetricsAddr, err)
		}
	}
	bg.Go(func() { _ = listener.Run(bgCtx) })

	select {
	case err := <-registered:
		if err != nil {
			stopBG()
			bg.Wait()
			return err
		}
	case <-ctx.Done():
		stopBG()
		bg.Wait()
		return nil
	}
	a.log.Info("agent started", "agent_id", a.agentID(), "workers", a.cfg.Workers, "version", Version)
	bg.Go(func() { a.heartbeat(bgCtx) })
	bg.Go(func() { a.housekeeping(bgCtx) })
	bg.Go(func() { a.logical.Run(bgCtx) })
	if a.cfg.MetricsAddr != "" {
		bg.Go(func() { a.watchQueues(bgCtx) })
	}

	a.serve(ctx, listener.C())

	stopBG()
	bg.Wait()
	a.deregister()
	if cause := context.Cause(ctx); errors.Is(cause, ErrSchemaChanged) {
		a.log.Error("agent stopped", "agent_id", a.agentID(), "reason", cause)
		return cause
	}
	a.log.Info("agent stopped", "agent_id", a.agentID())
	return nil
}

// serve is the producer loop: wake on notification, poll tick or a freed
// worker; claim as many requests as there are free workers.
func (a *Agent) serve(ctx context.Context, notified <-chan struct{}) {
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		running = map[int64]bool{} // requests this agent is running now
		freed   = make(chan struct{}, 1)
	)
	recoverTick := time.NewTicker(a.cfg.HeartbeatInterval)
	defer recoverTick.Stop()
	scheduleTick := time.NewTicker(a.cfg.scheduleEvery())
	defer scheduleTick.Stop()
	a.recoverOrphans(ctx)
	a.schedule(ctx)
	for {
		mu.Lock()
		free := a.cfg.Workers - len(running)
		mu.Unlock()
		if free > 0 && ctx.Err() == nil {
			reqs, err := queue.Claim(ctx, a.pool, a.agentID(), free)
			if err != nil && ctx.Err() == nil {
				a.log.Warn("cannot claim requests", "error", err)
				a.checkSchemaVersion(ctx) // the database refuses claims of agents of another version
			}
			for _, req := range reqs {
				mu.Lock()
				running[req.ID] = true
				mu.Unlock()
				wg.Go(func() {
					a.metrics.running.Inc()
					defer a.metrics.running.Dec()
					a.execute(a.jobCtx, req)
					mu.Lock()
					delete(running, req.ID)
					mu.Unlock()
					select {
					case freed <- struct{}{}:
					default:
					}
				})
			}
			if len(reqs) == free {
				continue // there may be more waiting
			}
		}
		poll := a.cfg.PollInterval/2 + rand.N(a.cfg.PollInterval/2+1)
		select {
		case <-ctx.Done():
			a.shutdown(&wg)
			return
		case <-notified:
		case <-freed:
		case <-recoverTick.C:
			a.recoverOrphans(ctx)
			mu.Lock()
			ids := slices.Collect(maps.Keys(running))
			mu.Unlock()
			if lost, err := queue.RequeueLost(ctx, a.pool, a.agentID(), ids); err != nil && ctx.Err() == nil {
				a.log.Warn("cannot check own requests", "error", err)
			} else if len(lost) > 0 {
				a.log.Warn("requeued requests this agent had lost track of", "request_ids", lost)
			}
		case <-scheduleTick.C:
			a.schedule(ctx)
		case <-time.After(poll):
		}
	}
}

// shutdown waits for running jobs, cancelling them after the timeout.
func (a *Agent) shutdown(wg *sync.WaitGroup) {
	a.stopOnce.Do(func() { close(a.stopping) })
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-time.After(a.cfg.ShutdownTimeout):
		a.log.Warn("shutdown timeout reached; cancelling running jobs", "timeout", a.cfg.ShutdownTimeout)
		a.cancelJob()
	}
	<-done
}

// shuttingDown reports whether Run has been told to stop.
func (a *Agent) shuttingDown() bool {
	select {
	case <-a.stopping:
		return true
	default:
		return false
	}
}

func (a *Agent) recoverOrphans(ctx context.Context) {
	rec, err := queue.Recover(ctx, a.pool, a.cfg.AgentTimeout, a.cfg.MaxAttempts)
	if err != nil {
		if ctx.Err() == nil {
			a.log.Warn("cannot recover requests of dead agents", "error", err)
		}
		return
	}
	if len(rec.Requeued) > 0 {
		a.log.Warn("requeued requests of a dead agent", "request_ids", rec.Requeued)
	}
	if len(rec.Failed) > 0 {
		a.log.Error("failed requests whose agent died too often", "request_ids", rec.Failed)
	}
}

// connectDedicated opens a connection outside the pool (LISTEN needs one).
func (a *Agent) connectDedicated(ctx context.Context) (*pgx.Conn, error) {
	return pgx.ConnectConfig(ctx, a.pool.Config().ConnConfig.Copy())
}

// hostname is the agent's host for its mimeo.agent row.
func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "unknown"
	}
	return h
}

// agentID is this agent's row in mimeo.agent (0 before registering).
func (a *Agent) agentID() int64 { return a.id.Load() }
