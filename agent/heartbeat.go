package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	// The row becomes visible only with the lock already held, so no other
	// agent can mistake a starting agent for a dead one.
	sqlRegister = `
WITH a AS (
    INSERT INTO mimeo.agent (host, pid, version) VALUES ($1, $2, $3) RETURNING id
)
SELECT id, pg_advisory_lock(mimeo.agent_lock_key(), id::int) FROM a`
	sqlRelock     = `SELECT pg_advisory_lock(mimeo.agent_lock_key(), $1::int)`
	sqlAgentAlive = `SELECT EXISTS (SELECT 1 FROM mimeo.agent WHERE id = $1)`
	sqlHeartbeat  = `UPDATE mimeo.agent SET last_seen = clock_timestamp() WHERE id = $1`
	// Peers forget an agent they judged dead (a long pause, say); one that
	// is in fact alive puts its row back under the same id.
	sqlReinsert = `
INSERT INTO mimeo.agent (id, host, pid, version) VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO UPDATE SET last_seen = clock_timestamp()`
	sqlDeregister = `DELETE FROM mimeo.agent WHERE id = $1`
)

// register inserts the agent's row and takes its liveness lock on conn; on
// a reconnection it only takes the lock again (or re-registers when the
// row was meanwhile removed as dead).
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
		a.log.Warn("agent row was removed while disconnected; registering again", "old_agent_id", id)
	}
	var id int64
	if err := conn.QueryRow(ctx, sqlRegister, hostname(), os.Getpid(), Version).Scan(&id, nil); err != nil {
		return fmt.Errorf("register agent: %w", err)
	}
	a.id.Store(id)
	return nil
}

// heartbeat updates last_seen every HeartbeatInterval until ctx ends.
func (a *Agent) heartbeat(ctx context.Context) {
	t := time.NewTicker(a.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			tag, err := a.pool.Exec(ctx, sqlHeartbeat, a.agentID())
			switch {
			case err != nil && ctx.Err() == nil:
				a.log.Warn("cannot write heartbeat", "error", err)
			case err == nil && tag.RowsAffected() == 0:
				a.log.Error("agent row was removed by another agent that took this one for dead; its running requests may have been requeued",
					"agent_id", a.agentID())
				if _, err := a.pool.Exec(ctx, sqlReinsert, a.agentID(), hostname(), os.Getpid(), Version); err != nil && ctx.Err() == nil {
					a.log.Warn("cannot restore agent row", "error", err)
				}
			}
		}
	}
}

// deregister removes the agent's row on a clean stop.
func (a *Agent) deregister() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := a.pool.Exec(ctx, sqlDeregister, a.agentID()); err != nil {
		a.log.Warn("cannot remove agent row", "error", err)
	}
}
