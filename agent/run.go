package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/queue"
)

// handler runs one request. It does its destination work on r.dst, the
// connection holding the table lock, and calls r.complete inside the
// transaction that commits the work.
type handler struct {
	job    string // job log name prefix, e.g. "Refresh Snap"
	run    func(ctx context.Context, r *run) error
	global bool // concerns no one table: no destination table, no table lock
}

// run is one execution of a request.
type run struct {
	req     queue.Request
	dest    ident.Name
	dst     *pgxpool.Conn
	log     hclog.Logger
	job     *jobLog
	agentID int64
	started time.Time
	debug   bool // p_debug: steps are logged at info instead of debug

	completed bool
	skipped   bool // ended without work, e.g. paused for a DST change
	dirty     bool // ran DBA SQL that may have changed session state: close dst
	rows      int64
	committed int64 // rows of batches already committed, should a later one fail
	message   string
	warning   bool

	// beforeComplete, when set, runs in complete's transaction first and
	// may rewrite the message (a check that ends in another handler's
	// transaction records its result there).
	beforeComplete func(ctx context.Context, tx pgx.Tx, message string) (string, error)
}

// commonArgs are the arguments every request may carry.
type commonArgs struct {
	Debug bool `json:"debug"`
}

// args decodes the request's arguments into v.
func (r *run) args(v any) error {
	if len(r.req.Args) == 0 {
		return nil
	}
	if err := json.Unmarshal(r.req.Args, v); err != nil {
		return fmt.Errorf("decode arguments of request %d: %w", r.req.ID, err)
	}
	return nil
}

// step runs fn as one job log step and logs it.
func (r *run) step(ctx context.Context, action string, fn func() (string, error)) error {
	start := time.Now()
	msg, err := fn()
	status := jobOK
	if err != nil {
		status, msg = jobCritical, err.Error()
	}
	r.job.add(ctx, action, start, status, msg)
	level := hclog.Debug
	if r.debug {
		level = hclog.Info
	}
	r.log.Log(level, action, "message", msg, "duration", time.Since(start).Round(time.Millisecond).String())
	return err
}

// jobStatus is the status a completed run's job ends with.
func (r *run) jobStatus() string {
	if r.warning {
		return jobWarning
	}
	return jobOK
}

// note records an informational step (no work of its own).
func (r *run) note(ctx context.Context, action, message string, warning bool) {
	status := jobOK
	if warning {
		status = jobWarning
		r.warning = true
		r.log.Warn(message)
	} else {
		r.log.Info(message)
	}
	r.job.add(ctx, action, time.Now(), status, message)
}

// complete marks the request done inside tx, the transaction that commits
// the run's work, so work and outcome land together or not at all.
func (r *run) complete(ctx context.Context, tx pgx.Tx, rows int64, message string) error {
	if r.beforeComplete != nil {
		var err error
		if message, err = r.beforeComplete(ctx, tx, message); err != nil {
			return err
		}
	}
	ok, err := queue.Finish(ctx, tx, r.agentID, r.req.ID, queue.Outcome{
		Status: queue.StatusDone, Rows: rows, JobID: r.job.id, Message: message})
	if err != nil {
		return err
	}
	if !ok {
		return errTakenOver
	}
	// The job ends with the request: whoever sees the request done finds
	// its job ended too.
	if _, err := tx.Exec(ctx, sqlJobEnd, r.job.id, r.jobStatus(), rows); err != nil {
		return fmt.Errorf("close job log: %w", err)
	}
	r.completed, r.rows, r.message = true, rows, message
	return nil
}

// skip ends the run without work: the request ends skipped with message.
func (r *run) skip(ctx context.Context, message string) {
	r.skipped, r.message = true, message
	r.note(ctx, "Skip", message, true)
}

// The advisory lock one run of a destination table holds, on its connection.
const sqlTableLock = `SELECT pg_advisory_lock(hashtextextended('mimeo.table:' || $1, 0))`

// tableLockWait is how long a run waits for its table's lock before it
// counts as "already running". The run before it commits its outcome a
// moment before it lets go of the lock: a refresh asked for right after
// another must not be skipped for that.
const tableLockWait = "3s"

// lockTable takes the session-level table lock on conn, waiting at most
// tableLockWait; false means another run holds it.
func lockTable(ctx context.Context, conn *pgxpool.Conn, dest string) (bool, error) {
	err := withTx(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '"+tableLockWait+"'"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, sqlTableLock, dest)
		return err
	})
	if hasCode(err, codeLockNotAvailable) {
		return false, nil
	}
	return err == nil, err
}

// sqlRunUnlock lets go of a run's table lock and its share of the schema
// lock (see holdSchema).
const sqlRunUnlock = `SELECT pg_advisory_unlock(hashtextextended('mimeo.table:' || $1, 0))
    AND pg_advisory_unlock_shared(mimeo.schema_lock_key())`

// sqlGlobalUnlock lets go of a global run's share of the schema lock.
const sqlGlobalUnlock = `SELECT pg_advisory_unlock_shared(mimeo.schema_lock_key())`

// execute runs one claimed request to its end and records the outcome.
func (a *Agent) execute(ctx context.Context, req queue.Request) queue.Outcome {
	log := a.log.With("request_id", req.ID, "action", req.Action, "table", req.DestTable)
	start := time.Now()
	out := a.executeLogged(ctx, req, log)
	a.metrics.observe(req.Action, req.DestTable, out, time.Since(start))
	if out.Status == "" {
		// Interrupted by shutdown. The run's connection, and with it the
		// table lock, is gone by now, so whoever takes the request next
		// will not find the table still locked.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dbTimeout)
		defer cancel()
		if err := queue.Requeue(rctx, a.pool, a.agentID(), req.ID, "requeued: interrupted by agent shutdown"); err != nil {
			log.Error("cannot requeue interrupted request", "error", err)
		}
		return out
	}
	if out.Status != queue.StatusDone || out.JobID == 0 {
		// Failures and skips are recorded here; successes were recorded in
		// the run's own transaction.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dbTimeout)
		defer cancel()
		if _, err := queue.Finish(fctx, a.pool, a.agentID(), req.ID, out); err != nil {
			log.Error("cannot record request outcome", "error", err)
		}
	}
	return out
}

func (a *Agent) executeLogged(ctx context.Context, req queue.Request, log hclog.Logger) queue.Outcome {
	h, ok := a.handlers[req.Action]
	if !ok {
		log.Error("unknown action")
		return queue.Outcome{Status: queue.StatusFailed, Error: fmt.Sprintf("%s: %v", req.Action, ErrUnknownAction)}
	}
	var dest ident.Name
	if !h.global {
		var err error
		if dest, err = ident.Parse(req.DestTable); err != nil {
			return queue.Outcome{Status: queue.StatusFailed, Error: fmt.Sprintf("destination table: %v", err)}
		}
	}
	var common commonArgs
	_ = json.Unmarshal(req.Args, &common)

	conn, err := a.pool.Acquire(ctx)
	if err != nil {
		return a.interrupted(ctx, req, log, fmt.Errorf("%s %s: acquire destination connection: %w", req.Action, req.DestTable, err))
	}
	healthy := false
	defer func() {
		if healthy {
			conn.Release()
			return
		}
		// A connection of a cancelled or broken run may be mid-protocol:
		// close it rather than return it (closing also drops its locks).
		_ = conn.Hijack().Close(context.Background())
	}()

	name := h.job
	if !h.global {
		name += ": " + req.DestTable
	}
	job, err := startJob(ctx, a.pool, log, name, req.DestTable, req.ID, a.agentID())
	if err != nil {
		return a.interrupted(ctx, req, log, fmt.Errorf("%s %s: %w", req.Action, req.DestTable, err))
	}
	log = log.With("job_id", job.id)
	r := &run{req: req, dest: dest, dst: conn, log: log, job: job, agentID: a.agentID(), started: time.Now(), debug: common.Debug}

	locked, err := true, error(nil)
	if !h.global {
		locked, err = lockTable(ctx, conn, req.DestTable)
	}
	if err != nil {
		job.end(ctx, jobCritical, 0)
		return a.interrupted(ctx, req, log, fmt.Errorf("%s %s: take table lock: %w", req.Action, req.DestTable, err))
	}
	if !locked {
		healthy = true
		msg := "already running: another run of " + req.DestTable + " holds its lock"
		r.note(ctx, "Lock table", msg, true)
		job.end(ctx, jobWarning, 0)
		return queue.Outcome{Status: queue.StatusSkipped, JobID: job.id, Message: msg}
	}

	if err := a.holdSchema(ctx, conn); err != nil {
		// Never run against a schema this agent does not know: the request
		// goes back to the queue for an agent that does. Closing the
		// connection lets go of both locks.
		r.note(context.WithoutCancel(ctx), "Check schema", err.Error(), true)
		job.end(ctx, jobWarning, 0)
		if errors.Is(err, ErrSchemaChanged) {
			return queue.Outcome{}
		}
		return a.interrupted(ctx, req, log, fmt.Errorf("%s %s: %w", req.Action, req.DestTable, err))
	}

	log.Info("run started", "attempt", req.Attempts)
	err = a.fault(faultRunStarted)
	if err == nil {
		err = runHandler(ctx, h, r)
	}
	if err == nil {
		var unlocked bool
		unlock, args := sqlRunUnlock, []any{req.DestTable}
		if h.global {
			unlock, args = sqlGlobalUnlock, nil
		}
		healthy = !r.dirty &&
			conn.QueryRow(context.WithoutCancel(ctx), unlock, args...).Scan(&unlocked) == nil && unlocked
	}
	elapsed := time.Since(r.started)
	switch {
	case err == nil && r.skipped:
		job.end(ctx, jobWarning, 0)
		log.Info("run skipped", "message", r.message)
		return queue.Outcome{Status: queue.StatusSkipped, JobID: job.id, Message: r.message}
	case err == nil && r.completed:
		job.end(ctx, r.jobStatus(), r.rows)
		log.Info("run finished", "rows", r.rows, "duration", elapsed.Round(time.Millisecond).String(), "message", r.message)
		return queue.Outcome{Status: queue.StatusDone, Rows: r.rows, JobID: job.id, Message: r.message}
	case err == nil:
		err = fmt.Errorf("%s %s: handler ended without recording its outcome", req.Action, req.DestTable)
		fallthrough
	default:
		if ctx.Err() != nil && a.shuttingDown() {
			r.note(context.WithoutCancel(ctx), "Interrupted", "cancelled by agent shutdown; rolled back", true)
			job.end(ctx, jobCritical, 0)
			return a.interrupted(ctx, req, log, err)
		}
		r.job.add(ctx, "Failed", time.Now(), jobCritical, err.Error())
		// Batches committed before the failure stay, and count.
		job.end(ctx, jobCritical, r.committed)
		log.Error("run failed", "error", err, "rows", r.committed, "duration", elapsed.Round(time.Millisecond).String())
		return queue.Outcome{Status: queue.StatusFailed, JobID: job.id, Rows: r.committed, Error: err.Error()}
	}
}

// interrupted returns the outcome of a run that could not go on: back to
// the queue (an empty outcome) when the agent is shutting down, else failed.
func (a *Agent) interrupted(ctx context.Context, req queue.Request, log hclog.Logger, err error) queue.Outcome {
	if a.shuttingDown() && ctx.Err() != nil {
		log.Warn("run interrupted by shutdown; request goes back to the queue")
		return queue.Outcome{} // execute requeues it
	}
	log.Error("run failed", "error", err)
	return queue.Outcome{Status: queue.StatusFailed, Error: err.Error()}
}

// runHandler runs a handler, turning a panic into a failed run: one bad
// table must not take the agent, and every other table, down with it.
func runHandler(ctx context.Context, h handler, r *run) (err error) {
	defer func() {
		if p := recover(); p != nil {
			r.dirty = true // the connection's state is unknown: close it
			err = fmt.Errorf("%s %s: internal error (please report it): %v", r.req.Action, r.req.DestTable, p)
			r.log.Error("run panicked", "panic", p, "stack", string(debug.Stack()))
		}
	}()
	return h.run(ctx, r)
}
