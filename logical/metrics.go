package logical

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the engine's Prometheus series, labelled by source
// (dblink_mapping id): few labels, whatever the number of tables.
type Metrics struct {
	retained *prometheus.GaugeVec
	resync   *prometheus.GaugeVec
	lag      *prometheus.GaugeVec
	changes  *prometheus.CounterVec
	txns     *prometheus.CounterVec
	failed   *prometheus.CounterVec
	unstream *prometheus.CounterVec
}

// NewMetrics creates the series and registers them with reg (when not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		retained: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mimeo_logical_retained_wal_bytes",
			Help: "WAL the source's slot keeps from being removed, as last measured.",
		}, []string{"source"}),
		resync: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mimeo_logical_needs_resync",
			Help: "1 while the source's slot cannot continue where the destination stopped (its tables need a repull).",
		}, []string{"source"}),
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mimeo_logical_apply_lag_seconds",
			Help: "Time between the source commit of the last transaction applied and its apply.",
		}, []string{"source"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_logical_changes_total",
			Help: "Row changes applied (or kept for a table being copied).",
		}, []string{"source"}),
		txns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_logical_transactions_total",
			Help: "Source transactions applied.",
		}, []string{"source"}),
		failed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_logical_table_failures_total",
			Help: "Tables marked failed (their changes stop until a repull).",
		}, []string{"source"}),
		unstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_logical_streaming_fallbacks_total",
			Help: "Times the stream gave up streaming a transaction in progress and started again without streaming.",
		}, []string{"source"}),
	}
	if reg != nil {
		reg.MustRegister(m.retained, m.resync, m.lag, m.changes, m.txns, m.failed, m.unstream)
	}
	return m
}

func label(dblink int) string { return strconv.Itoa(dblink) }
