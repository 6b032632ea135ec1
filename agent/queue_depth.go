package agent

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// queueDepthInterval is how often an agent serving metrics reads the
// source queues' sizes.
const queueDepthInterval = 30 * time.Second

// sqlQueueTables lists the dml and logdel tables with their source queue,
// by source.
const sqlQueueTables = `
SELECT dblink, dest_table, queue_table FROM mimeo.refresh_config_dml
UNION ALL
SELECT dblink, dest_table, queue_table FROM mimeo.refresh_config_logdel
ORDER BY 1, 2`

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
	rows, err := a.pool.Query(ctx, sqlQueueTables)
	if err != nil {
		a.log.Debug("cannot list the source queues", "error", err)
		return
	}
	type entry struct {
		dblink      int
		dest, queue string
	}
	entries, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (entry, error) {
		var e entry
		err := row.Scan(&e.dblink, &e.dest, &e.queue)
		return e, err
	})
	if err != nil {
		a.log.Debug("cannot list the source queues", "error", err)
		return
	}
	for start := 0; start < len(entries); {
		end := start
		for end < len(entries) && entries[end].dblink == entries[start].dblink {
			end++
		}
		group := entries[start:end]
		start = end
		names := make([]string, len(group))
		dest := map[string]string{}
		for i, e := range group {
			names[i] = e.queue
			dest[e.queue] = e.dest
		}
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		depths, err := a.sourceQueueRows(qctx, group[0].dblink, names)
		cancel()
		if err != nil {
			a.log.Debug("cannot read source queue sizes", "source", group[0].dblink, "error", err)
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
