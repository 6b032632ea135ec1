package agent

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// queueDepthInterval is how often an agent serving metrics reads the
// source queues' sizes.
const queueDepthInterval = 30 * time.Second

// sqlQueueRows reads the live row estimates of queue tables from the
// source's statistics: one cheap query per source, however many tables.
const sqlQueueRows = `
SELECT q.name, s.n_live_tup
FROM unnest($1::text[]) AS q(name)
JOIN pg_catalog.pg_stat_all_tables s ON s.relid = to_regclass(q.name)`

// watchQueues keeps mimeo_table_queue_rows up to date while metrics are
// served: the changes waiting in each dml/logdel table's source queue.
func (a *Agent) watchQueues(ctx context.Context) {
	t := time.NewTicker(queueDepthInterval)
	defer t.Stop()
	for {
		a.readQueueDepths(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// readQueueDepths reads every source's queue sizes once; a source that
// cannot be reached keeps its last values (and is logged at debug level).
func (a *Agent) readQueueDepths(ctx context.Context) {
	all, err := loadCheckTargets(ctx, a.pool, "")
	if err != nil {
		a.log.Debug("cannot list the source queues", "error", err)
		return
	}
	var queued []*checkTarget // dml and logdel tables
	for _, t := range all {
		if t.Queue != nil {
			queued = append(queued, t)
		}
	}
	for _, group := range bySource(queued) {
		names := make([]string, len(group))
		dest := map[string]string{}
		for i, t := range group {
			names[i] = t.Queue.Sanitize()
			dest[names[i]] = t.Dest.String()
		}
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		depths, err := a.sourceQueueRows(qctx, group[0].Dblink, names)
		cancel()
		if err != nil {
			a.log.Debug("cannot read source queue sizes", "source", group[0].Dblink, "error", err)
			continue
		}
		for q, n := range depths {
			a.metrics.queueRows.WithLabelValues(dest[q]).Set(float64(n))
		}
	}
}

func (a *Agent) sourceQueueRows(ctx context.Context, dblink int, queues []string) (map[string]int64, error) {
	src, _, err := a.sources.acquire(ctx, a.pool, dblink)
	if err != nil {
		return nil, err
	}
	defer src.Release()
	rows, err := src.Query(ctx, sqlQueueRows, queues)
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	var name string
	var n int64
	_, err = pgx.ForEachRow(rows, []any{&name, &n}, func() error { out[name] = n; return nil })
	return out, err
}
