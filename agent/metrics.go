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
	}
	m.registry.MustRegister(m.requests, m.rows, m.duration, m.running,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe records a finished run.
func (m *metrics) observe(action string, out queue.Outcome, elapsed time.Duration) {
	if out.Status == "" {
		return // handed back to the queue
	}
	m.requests.WithLabelValues(action, out.Status).Inc()
	m.rows.WithLabelValues(action).Add(float64(out.Rows))
	m.duration.WithLabelValues(action).Observe(elapsed.Seconds())
}

// serveMetrics serves /metrics on addr until ctx ends.
func (a *Agent) serveMetrics(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.registry, promhttp.HandlerOpts{}))
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
