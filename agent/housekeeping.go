package agent

import (
	"context"
	"fmt"
	"time"
)

// housekeepBatch is how many rows one housekeeping transaction looks at:
// small, so that no run waits on it.
const housekeepBatch = 1000

// sqlHousekeepLock lets one agent at a time clear old rows (the others
// skip that round); it is held for one batch's transaction only.
const sqlHousekeepLock = `SELECT pg_try_advisory_xact_lock(mimeo.agent_lock_key(), -1)`

// Each batch takes the next housekeepBatch rows in id order (ids grow
// with time) and deletes those finished before the cutoff; it says how
// many went, where it stopped, and whether the rows it saw were all older
// than the cutoff (so that older rows may follow). A table's newest
// request and newest successful job (checks aside) and its newest check of
// each kind stay whatever their age, so that refresh_status still shows
// its last success, last error and last check. With $4 true only refresh
// runs that moved nothing go (after NoopRetention, a shorter time: at
// thousands of tables they are most of the rows).
const (
	sqlClearRequests = `
WITH b AS (SELECT id, requested_at FROM mimeo.request WHERE id > $1 ORDER BY id LIMIT $3),
gone AS (
    DELETE FROM mimeo.request r USING b
    WHERE r.id = b.id AND r.status IN ('done', 'failed', 'skipped') AND r.finished_at < $2
      AND (NOT $4 OR (r.status = 'done' AND r.rows_moved = 0 AND r.action LIKE 'refresh\_%'))
      AND (r.dest_table IS NULL OR mimeo.is_check_action(r.action) OR EXISTS (
          SELECT 1 FROM mimeo.request n
          WHERE n.dest_table = r.dest_table AND n.id > r.id AND NOT mimeo.is_check_action(n.action)))
    RETURNING r.id)
SELECT (SELECT count(*) FROM gone), coalesce((SELECT max(id) FROM b), $1),
       coalesce((SELECT count(*) = $3 AND max(requested_at) < $2 FROM b), false)`
	sqlClearJobs = `
WITH b AS (SELECT job_id, start_time FROM mimeo.job_log WHERE job_id > $1 ORDER BY job_id LIMIT $3),
gone AS (
    DELETE FROM mimeo.job_log j USING b
    WHERE j.job_id = b.job_id AND j.status <> 'RUNNING' AND j.end_time < $2
      AND (NOT $4 OR (j.status = 'OK' AND j.rows_moved = 0 AND j.job_name LIKE 'Refresh %'))
      AND (j.dest_table IS NULL OR mimeo.is_check_job(j.job_name) OR EXISTS (
          SELECT 1 FROM mimeo.job_log n
          WHERE n.dest_table = j.dest_table AND n.job_id > j.job_id AND n.status = 'OK' AND NOT mimeo.is_check_job(n.job_name)))
    RETURNING j.job_id)
SELECT (SELECT count(*) FROM gone), coalesce((SELECT max(job_id) FROM b), $1),
       coalesce((SELECT count(*) = $3 AND max(start_time) < $2 FROM b), false)`
	sqlClearChecks = `
WITH b AS (SELECT id, checked_at FROM mimeo.validation WHERE id > $1 ORDER BY id LIMIT $3),
gone AS (
    DELETE FROM mimeo.validation v USING b
    WHERE v.id = b.id AND v.checked_at < $2
      AND (v.dest_table IS NULL OR EXISTS (
          SELECT 1 FROM mimeo.validation n WHERE n.dest_table = v.dest_table AND n.kind = v.kind AND n.id > v.id))
    RETURNING v.id)
SELECT (SELECT count(*) FROM gone), coalesce((SELECT max(id) FROM b), $1),
       coalesce((SELECT count(*) = $3 AND max(checked_at) < $2 FROM b), false)`
	sqlClearAgents = `
WITH gone AS (
    DELETE FROM mimeo.agent WHERE status IN ('stopped', 'dead') AND last_seen < $1 RETURNING id)
SELECT count(*) FROM gone`
)

// housekeeping deletes, every HousekeepingInterval, finished requests, job
// logs (with their steps), validation results and stopped agents' rows
// older than Retention (each table's newest of each stay; see above).
func (a *Agent) housekeeping(ctx context.Context) {
	if a.cfg.Retention <= 0 || a.cfg.HousekeepingInterval <= 0 {
		return
	}
	t := time.NewTicker(a.cfg.HousekeepingInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := a.housekeep(ctx); err != nil && ctx.Err() == nil {
				a.log.Warn("cannot clear old requests and job logs", "error", err)
			}
		}
	}
}

// housekeep runs one round of housekeeping.
func (a *Agent) housekeep(ctx context.Context) error {
	cutoff := a.cfg.now().Add(-time.Duration(a.cfg.Retention))
	requests, _, err := a.clearOld(ctx, sqlClearRequests, cutoff, 0, false)
	if err != nil {
		return fmt.Errorf("clear requests: %w", err)
	}
	jobs, _, err := a.clearOld(ctx, sqlClearJobs, cutoff, 0, false)
	if err != nil {
		return fmt.Errorf("clear job logs: %w", err)
	}
	if noop := time.Duration(a.cfg.NoopRetention); noop > 0 && noop < time.Duration(a.cfg.Retention) {
		// Runs that moved nothing, from where the last round stopped (ids
		// grow with time): each round reads only what is new since.
		ncut := a.cfg.now().Add(-noop)
		n, after, err := a.clearOld(ctx, sqlClearRequests, ncut, a.noopRequests, true)
		if err != nil {
			return fmt.Errorf("clear requests that moved nothing: %w", err)
		}
		a.noopRequests, requests = after, requests+n
		n, after, err = a.clearOld(ctx, sqlClearJobs, ncut, a.noopJobs, true)
		if err != nil {
			return fmt.Errorf("clear job logs that moved nothing: %w", err)
		}
		a.noopJobs, jobs = after, jobs+n
	}
	checks, _, err := a.clearOld(ctx, sqlClearChecks, cutoff, 0)
	if err != nil {
		return fmt.Errorf("clear validation results: %w", err)
	}
	var agents int64
	if err := a.pool.QueryRow(ctx, sqlClearAgents, cutoff).Scan(&agents); err != nil {
		return fmt.Errorf("clear stopped agents: %w", err)
	}
	if requests+jobs+checks+agents > 0 {
		a.log.Info("cleared rows older than the retention", "retention", time.Duration(a.cfg.Retention).String(),
			"requests", requests, "job_logs", jobs, "validations", checks, "agents", agents)
	}
	return nil
}

// clearOld runs a batch query from id after until it finds no older rows,
// one small transaction per batch; it stops early when another agent is at
// it. It returns how many rows went and the id it got to. extra are the
// query's parameters after the first three ($4: only runs that moved
// nothing, for requests and job logs).
func (a *Agent) clearOld(ctx context.Context, query string, cutoff time.Time, after int64, extra ...any) (int64, int64, error) {
	var total int64
	for {
		var (
			deleted int64
			more    bool
			locked  bool
			last    = after
		)
		tx, err := a.pool.Begin(ctx)
		if err != nil {
			return total, after, err
		}
		err = tx.QueryRow(ctx, sqlHousekeepLock).Scan(&locked)
		if err == nil && locked {
			args := append([]any{after, cutoff, housekeepBatch}, extra...)
			err = tx.QueryRow(ctx, query, args...).Scan(&deleted, &last, &more)
		}
		if err == nil {
			err = tx.Commit(ctx)
		}
		if err != nil {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			return total, after, err
		}
		total += deleted
		if !locked || !more {
			// A batch that reached past the cutoff is read again next time.
			return total, after, nil
		}
		after = last
	}
}
