package agent

import (
	"context"
	"time"
)

// scheduledTypes are refreshed by period; logical tables stream instead.
var scheduledTypes = []string{"snap", "table", "inserter", "updater", "dml", "logdel"}

const sqlSchedule = `SELECT count(*) FROM unnest($1::text[]) t, LATERAL mimeo.run_refresh(t, $2) id`

// scheduleBatch bounds the refreshes one schedule call enqueues per type:
// enough for thousands of tables coming due together, which then wait in
// the queue (oldest first) rather than for the next call.
const scheduleBatch = 1000

// scheduleEvery is how often due tables are looked for: at most a second,
// so a run starts about a second after it is due.
func (c Config) scheduleEvery() time.Duration { return min(c.PollInterval, time.Second) }

// schedule enqueues refreshes of tables (of every type) whose last_run + period has passed,
// as cron calling mimeo.run_refresh() would. run_refresh skips tables that
// already have a request pending and serializes concurrent callers, so
// every agent may call it.
func (a *Agent) schedule(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var n int
	if err := a.pool.QueryRow(ctx, sqlSchedule, scheduledTypes, scheduleBatch).Scan(&n); err != nil {
		if ctx.Err() == nil {
			a.log.Warn("cannot schedule periodic refreshes", "error", err)
		}
		return
	}
	if n > 0 {
		a.log.Debug("scheduled periodic refreshes", "count", n)
	}
}
