package agent

import (
	"context"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mimeo-dev/mimeo/queue"
)

// tableCollector exports, at each scrape, one series per replicated table
// and metric, read from mimeo.refresh_status in one query (cached for
// tableMetricsTTL, so several scrapers cost one query). Labels are the
// table and its type only: 10,000 tables are 10,000 series a metric.
type tableCollector struct {
	pool    *pgxpool.Pool
	timeout time.Duration // agents older than this are not alive

	mu      sync.Mutex
	at      time.Time
	metrics []prometheus.Metric
}

// tableMetricsTTL is how long one reading of refresh_status serves scrapes.
const tableMetricsTTL = 5 * time.Second

var (
	descLastSuccess = prometheus.NewDesc("mimeo_table_last_success_timestamp_seconds",
		"When the table's last successful run ended (logical: its last applied source transaction).", []string{"dest_table", "type"}, nil)
	descLag = prometheus.NewDesc("mimeo_table_lag_seconds",
		"Time since the data of the table's last successful run (logical: since the last apply).", []string{"dest_table", "type"}, nil)
	descPeriod = prometheus.NewDesc("mimeo_table_period_seconds",
		"The table's refresh period (absent when it has none).", []string{"dest_table", "type"}, nil)
	descControlLag = prometheus.NewDesc("mimeo_table_control_lag_seconds",
		"inserter and updater on a timestamp control column: now minus last_value.", []string{"dest_table", "type"}, nil)
	descHealthy = prometheus.NewDesc("mimeo_table_healthy",
		"1 when refresh_status says ok; 0 when the table is failing, invalid, overdue or never run.", []string{"dest_table", "type"}, nil)
	descValid = prometheus.NewDesc("mimeo_table_last_validation_ok",
		"1 when the table's last check (validate, validate_rowcount, check_source_columns, check_missing_source_tables) passed or was repaired.",
		[]string{"dest_table", "type"}, nil)
	descQueue = prometheus.NewDesc("mimeo_table_pending_requests",
		"1 while a request for the table is queued or running.", []string{"dest_table", "type"}, nil)
	descAgents = prometheus.NewDesc("mimeo_agents_alive",
		"Agents whose heartbeat is recent, as the destination records them.", nil, nil)
	descScrapeOK = prometheus.NewDesc("mimeo_table_metrics_up",
		"1 when the per-table series could be read from the destination.", nil, nil)
)

// Describe sends the descriptors of every series.
func (c *tableCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLastSuccess, descLag, descPeriod, descControlLag, descHealthy, descValid, descQueue, descAgents, descScrapeOK} {
		ch <- d
	}
}

// Collect sends the series, reading them when the cached ones are stale.
func (c *tableCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.metrics == nil || time.Since(c.at) > tableMetricsTTL {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ms, err := c.read(ctx)
		cancel()
		up := 1.0
		if err != nil {
			up, ms = 0, nil
		}
		c.metrics = append(ms, prometheus.MustNewConstMetric(descScrapeOK, prometheus.GaugeValue, up))
		c.at = time.Now()
	}
	for _, m := range c.metrics {
		ch <- m
	}
}

const sqlTableMetrics = `
SELECT s.dest_table, s.type, extract(epoch FROM coalesce(s.last_success, s.last_run))::float8,
       extract(epoch FROM s.lag)::float8, extract(epoch FROM s.period)::float8,
       CASE WHEN coalesce(i.control_type, u.control_type) IN ('timestamp', 'timestamptz') AND s.last_value IS NOT NULL
            THEN extract(epoch FROM now() - s.last_value::timestamptz)::float8 END,
       s.health = 'ok', s.last_validation_ok IS NOT FALSE, s.pending IS NOT NULL
FROM mimeo.refresh_status s
LEFT JOIN mimeo.refresh_config_inserter i ON i.dest_table = s.dest_table
LEFT JOIN mimeo.refresh_config_updater u ON u.dest_table = s.dest_table`

func (c *tableCollector) read(ctx context.Context) ([]prometheus.Metric, error) {
	var out []prometheus.Metric
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		out = append(out, prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...))
	}
	flag := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	alive, _, err := queue.AliveAgents(ctx, c.pool, c.timeout)
	if err != nil {
		return nil, err
	}
	gauge(descAgents, float64(alive))
	rows, err := c.pool.Query(ctx, sqlTableMetrics)
	if err != nil {
		return nil, err
	}
	var (
		dest, typ                            string
		success, lag, period, controlLag     *float64
		healthy, validationOK, pendingExists bool
	)
	_, err = pgx.ForEachRow(rows, []any{&dest, &typ, &success, &lag, &period, &controlLag, &healthy, &validationOK, &pendingExists}, func() error {
		if success != nil {
			gauge(descLastSuccess, *success, dest, typ)
		}
		if lag != nil {
			gauge(descLag, *lag, dest, typ)
		}
		if period != nil {
			gauge(descPeriod, *period, dest, typ)
		}
		if controlLag != nil {
			gauge(descControlLag, *controlLag, dest, typ)
		}
		gauge(descHealthy, flag(healthy), dest, typ)
		gauge(descValid, flag(validationOK), dest, typ)
		gauge(descQueue, flag(pendingExists), dest, typ)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
