package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mimeo-dev/mimeo/queue"
)

// metrics are the agent's Prometheus metrics, on a registry of its own so
// several agents in one process (tests) do not collide.
type metrics struct {
	registry *prometheus.Registry
	requests *prometheus.CounterVec
	rows     *prometheus.CounterVec
	duration *prometheus.HistogramVec
	running  prometheus.Gauge
	// Per table: what its runs on this agent moved, and how often they
	// failed (10,000 tables are 10,000 series).
	tableRows     *prometheus.CounterVec
	tableFailures *prometheus.CounterVec
	queueRows     *prometheus.GaugeVec // dml/logdel: changes waiting in the source queue
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_requests_total",
			Help: "Requests this agent finished, by action and outcome (done, failed, skipped).",
		}, []string{"action", "status"}),
		rows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_rows_moved_total",
			Help: "Rows copied into the destination, by action.",
		}, []string{"action"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "mimeo_run_duration_seconds",
			Help:    "How long runs took, by action.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 10),
		}, []string{"action"}),
		running: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "mimeo_runs_in_progress",
			Help: "Runs in progress on this agent.",
		}),
		tableRows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_table_rows_moved_total",
			Help: "Rows this agent's runs of the table copied into the destination.",
		}, []string{"dest_table"}),
		tableFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mimeo_table_failures_total",
			Help: "Runs of the table on this agent that failed.",
		}, []string{"dest_table"}),
		queueRows: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mimeo_table_queue_rows",
			Help: "dml and logdel: changes waiting in the table's source queue (the source's live-row estimate, read every 30 s).",
		}, []string{"dest_table"}),
	}
	m.registry.MustRegister(m.requests, m.rows, m.duration, m.running, m.tableRows, m.tableFailures, m.queueRows,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe records a finished run of dest ("" for none).
func (m *metrics) observe(action, dest string, out queue.Outcome, elapsed time.Duration) {
	if out.Status == "" {
		return // handed back to the queue
	}
	m.requests.WithLabelValues(action, out.Status).Inc()
	m.rows.WithLabelValues(action).Add(float64(out.Rows))
	m.duration.WithLabelValues(action).Observe(elapsed.Seconds())
	if dest == "" {
		return
	}
	m.tableRows.WithLabelValues(dest).Add(float64(out.Rows))
	if out.Status == queue.StatusFailed {
		m.tableFailures.WithLabelValues(dest).Inc()
	}
}

// serveMetrics serves /metrics on addr until ctx ends.
func (a *Agent) serveMetrics(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", a.healthz)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	a.log.Info("serving metrics", "addr", ln.Addr().String())
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("metrics server stopped", "error", err)
		}
	}()
	return nil
}

// healthz answers 200 "ok" while the agent is registered, not stopping and
// its destination answers; 503 with the reason otherwise.
func (a *Agent) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	var why string
	switch {
	case a.shuttingDown():
		why = "stopping"
	case a.agentID() == 0:
		why = "not registered with the destination yet"
	default:
		if err := a.pool.Ping(ctx); err != nil {
			why = "destination unreachable: " + err.Error()
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if why != "" {
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = w.Write([]byte(why + "\n"))
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}
