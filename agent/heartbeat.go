package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/queue"
	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

const (
	// The row becomes visible only with the lock already held, so no other
	// agent can mistake a starting agent for a dead one.
	sqlRegister = `
WITH a AS (
    INSERT INTO mimeo.agent (host, pid, version, schema_version) VALUES ($1, $2, $3, $4) RETURNING id
)
SELECT id, pg_advisory_lock(mimeo.agent_lock_key(), id::int) FROM a`
	sqlRelock     = `SELECT pg_advisory_lock(mimeo.agent_lock_key(), $1::int)`
	sqlAgentAlive = `SELECT EXISTS (SELECT 1 FROM mimeo.agent WHERE id = $1 AND status IN ('running', 'stopping'))`
	sqlHeartbeat  = `UPDATE mimeo.agent SET last_seen = clock_timestamp() WHERE id = $1 AND status IN ('running', 'stopping')`
	// Peers mark an agent dead when they judge it so (a long pause, say);
	// one that is in fact alive takes its row back under the same id.
	sqlReinsert = `
INSERT INTO mimeo.agent (id, host, pid, version, schema_version) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET last_seen = clock_timestamp(), status = 'running', status_detail = NULL, stopped_at = NULL`
	sqlStopping   = `UPDATE mimeo.agent SET status = 'stopping', status_detail = $2 WHERE id = $1`
	sqlDeregister = `UPDATE mimeo.agent SET status = 'stopped', stopped_at = clock_timestamp(), last_seen = clock_timestamp() WHERE id = $1`
)

// register inserts the agent's row and takes its liveness lock on conn; on
// a reconnection it only takes the lock again (or re-registers when the
// row was meanwhile marked dead).
func (a *Agent) register(ctx context.Context, conn *pgx.Conn) error {
	if id := a.agentID(); id != 0 {
		var alive bool
		if err := conn.QueryRow(ctx, sqlAgentAlive, id).Scan(&alive); err != nil {
			return fmt.Errorf("check agent row: %w", err)
		}
		if alive {
			if _, err := conn.Exec(ctx, sqlRelock, id); err != nil {
				return fmt.Errorf("take agent lock: %w", err)
			}
			return nil
		}
		a.log.Warn("agent row was marked dead while disconnected; registering again", "old_agent_id", id)
	}
	var id int64
	if err := conn.QueryRow(ctx, sqlRegister, hostname(), os.Getpid(), Version, mimeosql.Version).Scan(&id, nil); err != nil {
		return fmt.Errorf("register agent: %w", err)
	}
	a.id.Store(id)
	return nil
}

// heartbeat updates last_seen every HeartbeatInterval until ctx ends, and
// checks each time that the schema is still the one this agent knows.
func (a *Agent) heartbeat(ctx context.Context) {
	t := time.NewTicker(a.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			a.checkSchemaVersion(ctx)
			tag, err := a.pool.Exec(ctx, sqlHeartbeat, a.agentID())
			switch {
			case err != nil && ctx.Err() == nil:
				a.log.Warn("cannot write heartbeat", "error", err)
			case err == nil && tag.RowsAffected() == 0:
				a.log.Error("agent row was marked dead by another agent that took this one for dead; its running requests may have been requeued",
					"agent_id", a.agentID())
				if _, err := a.pool.Exec(ctx, sqlReinsert, a.agentID(), hostname(), os.Getpid(), Version, mimeosql.Version); err != nil && ctx.Err() == nil {
					a.log.Warn("cannot restore agent row", "error", err)
				}
			}
		}
	}
}

// deregister marks the agent's row stopped on a clean stop; the row stays,
// so waiters and monitors can tell when an agent was last alive. Old rows
// go (a cron job's refreshes each leave one).
func (a *Agent) deregister() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := a.pool.Exec(ctx, sqlDeregister, a.agentID()); err != nil {
		a.log.Warn("cannot mark agent row stopped", "error", err)
	}
	if err := queue.PruneAgents(ctx, a.pool); err != nil {
		a.log.Warn("cannot prune agent rows", "error", err)
	}
}
