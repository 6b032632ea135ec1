package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/queue"
)

// ErrFailed means a request ran and failed; the outcome holds its error.
var ErrFailed = errors.New("request failed")

// RefreshOnce refreshes one destination table right here, without a
// running daemon (for cron scripts): it registers as an agent for the
// duration, records the request as running (so it shows in mimeo.request
// and the job log like any other), runs it and returns the outcome.
func (a *Agent) RefreshOnce(ctx context.Context, destTable string, debug bool) (queue.Outcome, error) {
	var canonical, typ string
	if err := a.pool.QueryRow(ctx, `SELECT mimeo.qualified_name($1, 'dest_table')`, destTable).Scan(&canonical); err != nil {
		return queue.Outcome{}, fmt.Errorf("refresh %s: %w", destTable, err)
	}
	err := a.pool.QueryRow(ctx, `SELECT type FROM mimeo.refresh_config WHERE dest_table = $1`, canonical).Scan(&typ)
	if errors.Is(err, pgx.ErrNoRows) {
		return queue.Outcome{}, fmt.Errorf("refresh %s: %w (SELECT dest_table FROM mimeo.refresh_config lists what is)", canonical, ErrNotConfigured)
	}
	if err != nil {
		return queue.Outcome{}, fmt.Errorf("refresh %s: read config: %w", canonical, err)
	}

	conn, err := a.connectDedicated(ctx)
	if err != nil {
		return queue.Outcome{}, fmt.Errorf("connect to destination: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := a.register(ctx, conn); err != nil {
		return queue.Outcome{}, err
	}
	defer a.deregister()
	// Beat like a daemon, or the daemons would take a long run for dead.
	hbCtx, stopHeartbeat := context.WithCancel(ctx)
	defer stopHeartbeat()
	go a.heartbeat(hbCtx)

	if typ == "logical" {
		// Nothing streams without a daemon: stream for the sync point
		// (the stream lock keeps this apart from a running daemon's).
		lctx, stopLogical := context.WithCancel(ctx)
		defer stopLogical()
		go a.logical.Run(lctx)
	}
	req, err := queue.InsertRunning(ctx, a.pool, a.agentID(), "refresh_"+typ, canonical, map[string]any{"debug": debug})
	if err != nil {
		return queue.Outcome{}, err
	}
	out := a.execute(ctx, req)
	if out.Status == queue.StatusFailed {
		return out, fmt.Errorf("%w: %s", ErrFailed, out.Error)
	}
	return out, nil
}
