package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Job log statuses, as pg_jobmon names them.
const (
	jobRunning  = "RUNNING"
	jobOK       = "OK"
	jobWarning  = "WARNING"
	jobCritical = "CRITICAL"
)

const (
	sqlJobStart = `
INSERT INTO mimeo.job_log (job_name, dest_table, request_id, agent_id)
VALUES ($1, nullif($2, ''), $3, $4) RETURNING job_id`
	sqlJobStep = `
INSERT INTO mimeo.job_detail (job_id, step_id, action, start_time, end_time, elapsed_time, status, message)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`
	sqlJobEnd = `UPDATE mimeo.job_log SET end_time = clock_timestamp(), status = $2, rows_moved = $3 WHERE job_id = $1`
)

// jobLog writes one run's entry in mimeo.job_log and its steps in
// mimeo.job_detail. It writes through the pool, outside the run's
// transaction, so the trail survives a run that rolls back.
type jobLog struct {
	pool *pgxpool.Pool
	log  hclog.Logger
	id   int64
	step int
}

// startJob opens a job log entry named like pg_jobmon jobs
// ("Refresh Snap: public.items").
func startJob(ctx context.Context, pool *pgxpool.Pool, log hclog.Logger, name, dest string, requestID, agentID int64) (*jobLog, error) {
	j := &jobLog{pool: pool, log: log}
	if err := pool.QueryRow(ctx, sqlJobStart, name, dest, requestID, agentID).Scan(&j.id); err != nil {
		return nil, fmt.Errorf("start job log: %w", err)
	}
	return j, nil
}

// add records a finished step. A failure to write the trail is logged, not
// fatal: the run's own outcome matters more.
func (j *jobLog) add(ctx context.Context, action string, start time.Time, status, message string) {
	j.step++
	end := time.Now()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dbTimeout)
	defer cancel()
	if _, err := j.pool.Exec(ctx, sqlJobStep, j.id, j.step, action, start, end,
		end.Sub(start).Seconds(), status, message); err != nil {
		j.log.Warn("cannot write job detail", "error", err)
	}
}

// end closes the job with its final status.
func (j *jobLog) end(ctx context.Context, status string, rows int64) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dbTimeout)
	defer cancel()
	if _, err := j.pool.Exec(ctx, sqlJobEnd, j.id, status, rows); err != nil {
		j.log.Warn("cannot close job log", "error", err)
	}
}
