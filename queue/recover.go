package queue

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// An agent is dead when its row says it stopped or died, when its
// liveness lock (mimeo.agent_lock_key(), id) is no longer held on this
// database, or when its heartbeat is older than $1.
const sqlDeadAgents = `
SELECT a.id FROM mimeo.agent a
WHERE a.status NOT IN ('running', 'stopping')
   OR a.last_seen < clock_timestamp() - $1::interval
   OR NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
          AND l.classid = mimeo.agent_lock_key()::oid
          AND l.objid = a.id::oid AND l.objsubid = 2)`

// Requests left running by a dead (or unknown) agent go back to the queue,
// or fail once they have used up their attempts.
const sqlRecoverOrphans = `
WITH dead AS (` + sqlDeadAgents + `),
orphans AS (
    SELECT r.id FROM mimeo.request r
    WHERE r.status = 'running'
      AND (r.agent_id IS NULL OR r.agent_id IN (SELECT id FROM dead)
           OR NOT EXISTS (SELECT 1 FROM mimeo.agent a WHERE a.id = r.agent_id))
      -- A run whose table lock is still held is alive, whatever its
      -- agent's liveness lock says (that one may be between reconnects).
      AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended('mimeo.table:' || r.dest_table, 0))
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE mimeo.request r
SET status = CASE WHEN r.attempts >= $2 THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN r.attempts >= $2 THEN clock_timestamp() END,
    started_at = CASE WHEN r.attempts >= $2 THEN r.started_at END,
    agent_id = CASE WHEN r.attempts >= $2 THEN r.agent_id END,
    error = CASE WHEN r.attempts >= $2
        THEN format('agent %s stopped while running this request (attempt %s of %s); giving up', r.agent_id, r.attempts, $2)
        ELSE r.error END,
    message = CASE WHEN r.attempts >= $2 THEN r.message
        ELSE format('requeued: agent %s stopped while running it (attempt %s of %s)', r.agent_id, r.attempts, $2) END
FROM orphans o WHERE r.id = o.id
RETURNING r.id, r.status`

// Job log entries of dead agents are closed, and the agents forgotten.
const sqlCloseDeadJobs = `
WITH dead AS (` + sqlDeadAgents + `)
UPDATE mimeo.job_log SET status = 'CRITICAL', end_time = clock_timestamp()
WHERE status = 'RUNNING' AND (agent_id IN (SELECT id FROM dead)
      OR NOT EXISTS (SELECT 1 FROM mimeo.agent a WHERE a.id = job_log.agent_id))`

// Dead agents are marked so; their rows stay a day (the newest for good),
// so a waiter can tell when an agent was last alive.
const sqlMarkDeadAgents = `
WITH dead AS (` + sqlDeadAgents + `)
UPDATE mimeo.agent SET status = 'dead', stopped_at = clock_timestamp(),
    status_detail = coalesce(status_detail, 'judged dead: no heartbeat or liveness lock after ' || last_seen)
WHERE id IN (SELECT id FROM dead) AND status IN ('running', 'stopping')
  AND NOT EXISTS (SELECT 1 FROM mimeo.request r WHERE r.status = 'running' AND r.agent_id = agent.id)`

const sqlPruneAgents = `
DELETE FROM mimeo.agent a
WHERE a.status IN ('stopped', 'dead') AND coalesce(a.stopped_at, a.last_seen) < clock_timestamp() - interval '1 day'
  AND a.id <> (SELECT id FROM mimeo.agent ORDER BY last_seen DESC LIMIT 1)
  AND NOT EXISTS (SELECT 1 FROM mimeo.request r WHERE r.status = 'running' AND r.agent_id = a.id)`

// Recovered lists what Recover did.
type Recovered struct {
	Requeued []int64
	Failed   []int64
}

// Recover returns to the queue (or fails, after maxAttempts) the requests
// of agents that died while running them, closes their job log entries and
// marks them dead. staleAfter bounds how old a live agent's heartbeat may be.
func Recover(ctx context.Context, db DB, staleAfter time.Duration, maxAttempts int) (Recovered, error) {
	var out Recovered
	stale := fmt.Sprintf("%d milliseconds", staleAfter.Milliseconds())
	rows, err := db.Query(ctx, sqlRecoverOrphans, stale, maxAttempts)
	if err != nil {
		return out, fmt.Errorf("recover orphaned requests: %w", err)
	}
	for rows.Next() {
		var id int64
		var status string
		if err := rows.Scan(&id, &status); err != nil {
			rows.Close()
			return out, fmt.Errorf("recover orphaned requests: %w", err)
		}
		if status == StatusFailed {
			out.Failed = append(out.Failed, id)
		} else {
			out.Requeued = append(out.Requeued, id)
		}
	}
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("recover orphaned requests: %w", err)
	}
	if _, err := db.Exec(ctx, sqlCloseDeadJobs, stale); err != nil {
		return out, fmt.Errorf("close jobs of dead agents: %w", err)
	}
	if _, err := db.Exec(ctx, sqlMarkDeadAgents, stale); err != nil {
		return out, fmt.Errorf("mark dead agents: %w", err)
	}
	return out, PruneAgents(ctx, db)
}

// PruneAgents deletes the rows of agents that stopped or died more than a
// day ago, but for the newest row (which tells when an agent was last
// alive).
func PruneAgents(ctx context.Context, db DB) error {
	if _, err := db.Exec(ctx, sqlPruneAgents); err != nil {
		return fmt.Errorf("prune agent rows: %w", err)
	}
	return nil
}

// Requests this agent holds as running but is not running (a claim whose
// reply was lost, a finish that could not be written) go back to the
// queue; the grace period spares requests being claimed at this moment.
const sqlRequeueLost = `
UPDATE mimeo.request
SET status = 'queued', agent_id = NULL, started_at = NULL,
    message = 'requeued: its agent had lost track of it'
WHERE agent_id = $1 AND status = 'running' AND id <> ALL(coalesce($2::bigint[], '{}'))
  AND started_at < clock_timestamp() - interval '30 seconds'
RETURNING id`

// RequeueLost hands back to the queue the requests agentID holds as running
// apart from those in running, its real work.
func RequeueLost(ctx context.Context, db DB, agentID int64, running []int64) ([]int64, error) {
	rows, err := db.Query(ctx, sqlRequeueLost, agentID, running)
	if err != nil {
		return nil, fmt.Errorf("requeue lost requests: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("requeue lost requests: %w", err)
	}
	return ids, nil
}

// sqlAliveAgents counts the running agents that are not dead by
// sqlDeadAgents' measure (a killed one loses its liveness lock at once),
// and tells when any agent was last seen.
const sqlAliveAgents = `
WITH dead AS (` + sqlDeadAgents + `)
SELECT count(*) FILTER (WHERE a.status = 'running' AND a.id NOT IN (SELECT id FROM dead)), max(a.last_seen)
FROM mimeo.agent a`

// AliveAgents counts the agents alive now, their heartbeat no older than
// staleAfter, and returns when any agent was last seen (nil if none ever
// registered).
func AliveAgents(ctx context.Context, db DB, staleAfter time.Duration) (int, *time.Time, error) {
	var n int
	var seen *time.Time
	stale := fmt.Sprintf("%d milliseconds", staleAfter.Milliseconds())
	if err := db.QueryRow(ctx, sqlAliveAgents, stale).Scan(&n, &seen); err != nil {
		return 0, nil, fmt.Errorf("count live agents: %w", err)
	}
	return n, seen, nil
}
