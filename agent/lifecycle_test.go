package agent_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
)

// With polling practically off, only LISTEN/NOTIFY can deliver the request.
func TestNotificationWakesTheAgent(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	cfg := e.config()
	cfg.PollInterval = time.Hour
	e.startAgent(cfg)
	var agents int
	require.Eventually(t, func() bool {
		return e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.agent`).Scan(&agents) == nil && agents == 1
	}, 10*time.Second, 20*time.Millisecond, "the agent registers its heartbeat row")
	start := time.Now()
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	require.Less(t, time.Since(start), 10*time.Second)
}

// Tables with a period are refreshed without anyone asking.
func TestPeriodicRefresh(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	e.exec(e.dst, `UPDATE mimeo.refresh_config_snap SET period = '1 second'`)
	e.writeAndWaitStats("public.items", `INSERT INTO items (id) VALUES (-1)`)
	require.Eventually(t, func() bool {
		return checksum(t, e.ctx, e.src, "public.items") == checksum(t, e.ctx, e.dst, "public.items")
	}, 20*time.Second, 100*time.Millisecond)
	var scheduled int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.request WHERE action = 'refresh_snap' AND status = 'done'`).Scan(&scheduled))
	require.Positive(t, scheduled)
}

// SIGTERM (a cancelled Run) lets a running job finish within the shutdown
// timeout; past it, the job is rolled back and its request requeued.
func TestShutdownRequeuesUnfinishedWork(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 3000)
	first := e.config()
	first.ShutdownTimeout = 200 * time.Millisecond
	a, err := agent.New(e.ctx, first, hclog.New(&hclog.LoggerOptions{Output: testWriter{t}}))
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = a.Run(ctx) })
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	before := checksum(t, e.ctx, e.dst, "public.items")
	e.writeAndWaitStats("public.items", `DELETE FROM items WHERE id > 100`)
	e.slowSource("public.items")
	id := e.request(`SELECT mimeo.refresh_snap('public.items')`)
	require.Eventually(t, func() bool {
		var status string
		return e.dst.QueryRow(e.ctx, `SELECT status FROM mimeo.request WHERE id = $1`, id).Scan(&status) == nil && status == "running"
	}, 10*time.Second, 10*time.Millisecond)
	cancel()
	wg.Wait()
	a.Close()

	var status, message string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT status, message FROM mimeo.request WHERE id = $1`, id).Scan(&status, &message))
	require.Equal(t, "queued", status)
	require.Contains(t, message, "interrupted by agent shutdown")
	require.Equal(t, before, checksum(t, e.ctx, e.dst, "public.items"), "nothing half-applied")
	var agents int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.agent WHERE status <> 'stopped'`).Scan(&agents))
	require.Zero(t, agents, "a clean stop marks the agent row stopped")

	e.exec(e.dst, `UPDATE mimeo.refresh_config_snap SET condition = NULL`)
	e.startAgent(e.config())
	require.Equal(t, "done", e.await(id).Status)
	e.requireSame("public.items", "public.items")
}

func TestMetricsEndpoint(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 25)
	addr := freeAddr(t)
	cfg := e.config()
	cfg.MetricsAddr = addr
	e.startAgent(cfg)
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)

	var body string
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		body = string(b)
		// The metric is counted just after the request row says done.
		return resp.StatusCode == http.StatusOK &&
			strings.Contains(body, `mimeo_requests_total{action="snapshot_maker",status="done"} 1`)
	}, 5*time.Second, 50*time.Millisecond, "metrics: %s", body)
	require.Contains(t, body, `mimeo_rows_moved_total{action="snapshot_maker"} 25`)
	// Per table, by name.
	require.Contains(t, body, `mimeo_table_rows_moved_total{dest_table="public.items"} 25`)
	require.Contains(t, body, `mimeo_table_healthy{dest_table="public.items",type="snap"} 1`)
	require.Contains(t, body, `mimeo_table_last_validation_ok{dest_table="public.items",type="snap"} 1`)
	require.Contains(t, body, `mimeo_table_last_success_timestamp_seconds{dest_table="public.items",type="snap"}`)
	require.Contains(t, body, `mimeo_table_lag_seconds{dest_table="public.items",type="snap"}`)
	require.Contains(t, body, `mimeo_agents_alive 1`)
	require.Contains(t, body, `mimeo_table_metrics_up 1`)

	// A copy found wrong pages: healthy drops to 0.
	e.exec(e.dst, `DELETE FROM public.items WHERE id = 3`)
	e.done(`SELECT mimeo.validate('public.items')`)
	require.Eventually(t, func() bool {
		body = scrape(addr)
		return strings.Contains(body, `mimeo_table_healthy{dest_table="public.items",type="snap"} 0`) &&
			strings.Contains(body, `mimeo_table_last_validation_ok{dest_table="public.items",type="snap"} 0`)
	}, 10*time.Second, 100*time.Millisecond, "metrics: %s", body)

	resp, err := http.Get("http://" + addr + "/healthz")
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "ok\n", string(b))
}

// An agent serving metrics reports how many changes wait in each dml or
// logdel table's source queue.
func TestQueueDepthMetric(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.q (id int PRIMARY KEY, v text)`)
	e.prepareTriggers("public.q")
	e.startAgent(e.config())
	e.done(`SELECT mimeo.dml_maker('public.q', $1)`, e.dblink)
	var queue string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT queue_table FROM mimeo.refresh_config_dml WHERE dest_table = 'public.q'`).Scan(&queue))
	e.writeAndWaitStats(queue, `INSERT INTO public.q SELECT g, 'v' FROM generate_series(1, 37) g`)

	addr := freeAddr(t)
	cfg := e.config()
	cfg.MetricsAddr = addr
	e.startAgent(cfg)
	var body string
	require.Eventually(t, func() bool {
		body = scrape(addr)
		return strings.Contains(body, `mimeo_table_queue_rows{dest_table="public.q"} 37`)
	}, 15*time.Second, 100*time.Millisecond, "metrics: %s", body)
}

// scrape reads /metrics ("" when it cannot).
func scrape(addr string) string {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return ""
	}
	return string(b)
}

// freeAddr is a local TCP address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}
