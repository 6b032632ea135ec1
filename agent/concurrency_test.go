package agent_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// slowSource makes every refresh of dest read slowly (a sleep per source
// row) and forget the statistics, so runs overlap and always copy.
func (e *env) slowSource(dest string) { e.slowSourceBy(dest, "0.002") }

// slowSourceBy sleeps seconds per source row.
func (e *env) slowSourceBy(dest, seconds string) {
	e.exec(e.dst, `UPDATE mimeo.refresh_config_snap
SET condition = format('pg_sleep(%s)::text = %L', $2::numeric, ''), n_tup_ins = NULL WHERE dest_table = $1`, dest, seconds)
}

func TestConcurrentRefreshOfOneTableSkipsTheSecond(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 400)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	e.slowSourceBy("public.items", "0.015") // ~6s: longer than a run waits for the lock

	var first, second int64
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT mimeo.refresh_snap('public.items'), mimeo.refresh_snap('public.items')`).Scan(&first, &second))
	a, b := e.await(first), e.await(second)
	statuses := []string{a.Status, b.Status}
	require.ElementsMatch(t, []string{"done", "skipped"}, statuses)
	skipped := a
	if b.Status == "skipped" {
		skipped = b
	}
	require.Contains(t, *skipped.Message, "already running")
	var warning string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT status FROM mimeo.job_log WHERE job_id = $1`, *skipped.JobID).Scan(&warning))
	require.Equal(t, "WARNING", warning)
	e.requireSame("public.items", "public.items")
}

// Two agents on one destination never run a request twice, nor one table
// twice at once.
func TestTwoAgentsShareTheQueueSafely(t *testing.T) {
	t.Parallel()
	e := setup(t)
	tables := []string{"public.a", "public.b", "public.c"}
	for _, tbl := range tables {
		e.createItems(tbl, 200)
	}
	e.startAgent(e.config())
	e.startAgent(e.config())
	for _, tbl := range tables {
		e.done(`SELECT mimeo.snapshot_maker($1, $2)`, tbl, e.dblink)
		e.slowSource(tbl)
	}
	var ids []int64
	for range 4 {
		for _, tbl := range tables {
			ids = append(ids, e.request(`SELECT mimeo.refresh_snap($1)`, tbl))
		}
	}
	agents := map[int64]bool{}
	for _, id := range ids {
		o := e.await(id)
		require.Contains(t, []string{"done", "skipped"}, o.Status)
		var attempts int
		var agentID int64
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT attempts, agent_id FROM mimeo.request WHERE id = $1`, id).Scan(&attempts, &agentID))
		require.Equal(t, 1, attempts, "request %d ran once", id)
		agents[agentID] = true
	}
	require.Len(t, agents, 2, "both agents took work")
	var jobs, overlaps int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.job_log WHERE request_id = ANY($1)`, ids).Scan(&jobs))
	require.Equal(t, len(ids), jobs, "one job per request")
	// A run's steps all happen while it holds the table lock.
	require.NoError(t, e.dst.QueryRow(e.ctx, `
WITH runs AS (
    SELECT j.job_id, j.dest_table, min(d.start_time) AS work_start, max(d.end_time) AS work_end
    FROM mimeo.job_log j JOIN mimeo.job_detail d ON d.job_id = j.job_id
    WHERE j.status = 'OK' AND j.request_id = ANY($1)
    GROUP BY j.job_id, j.dest_table)
SELECT count(*) FROM runs x JOIN runs y
  ON x.dest_table = y.dest_table AND x.job_id < y.job_id
 AND tstzrange(x.work_start, x.work_end) && tstzrange(y.work_start, y.work_end)`, ids).Scan(&overlaps))
	require.Zero(t, overlaps, "no table ran twice at once")
	for _, tbl := range tables {
		e.requireSame(tbl, tbl)
	}
}

// buildAgent compiles mimeo-agent for tests that need a process to kill.
func buildAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "mimeo-agent")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/mimeo-dev/mimeo/cmd/mimeo-agent").CombinedOutput()
	require.NoError(t, err, string(out))
	return bin
}

// startAgentProcess runs mimeo-agent as a process of its own, to be killed.
func (e *env) startAgentProcess() *exec.Cmd {
	e.t.Helper()
	bin := buildAgent(e.t)
	cmd := exec.Command(bin, "run")
	cmd.Env = append(os.Environ(), "MIMEO_DATABASE_URL="+e.config().DatabaseURL, "MIMEO_POLL_INTERVAL=200ms", "MIMEO_LOG_LEVEL=debug")
	logFile, err := os.Create(filepath.Join(e.t.TempDir(), "agent.log"))
	require.NoError(e.t, err)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	require.NoError(e.t, cmd.Start())
	e.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd
}

// An agent killed (SIGKILL) in the middle of a copy leaves readers on the
// old copy; its request is recovered and the next run succeeds.
func TestAgentKilledMidRefresh(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 2000)
	cfg := e.config()
	cmd := e.startAgentProcess()

	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	before := checksum(t, e.ctx, e.dst, "public.items")
	e.writeAndWaitStats("public.items", `DELETE FROM items WHERE id <= 1000`)
	e.slowSource("public.items")
	id := e.request(`SELECT mimeo.refresh_snap('public.items')`)

	// Kill the agent while the idle table is being loaded (the slowed
	// source keeps the COPY open for seconds).
	deadline := time.Now().Add(30 * time.Second)
	for {
		var copying bool
		require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
WHERE datname = current_database() AND state = 'active' AND query LIKE 'COPY %items_snap2% FROM STDIN%')`).Scan(&copying))
		if copying {
			break
		}
		require.True(t, time.Now().Before(deadline), "copy never started")
		time.Sleep(5 * time.Millisecond)
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	_ = cmd.Wait()

	require.Equal(t, before, checksum(t, e.ctx, e.dst, "public.items"), "readers keep the old copy")
	require.Equal(t, "items_snap1", e.viewReads("public.items"))

	// A new agent recovers the orphaned request and completes it.
	e.exec(e.dst, `UPDATE mimeo.refresh_config_snap SET condition = NULL`)
	e.startAgent(cfg)
	o := e.await(id)
	require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
	var attempts int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT attempts FROM mimeo.request WHERE id = $1`, id).Scan(&attempts))
	require.Equal(t, 2, attempts)
	e.requireSame("public.items", "public.items")
	var critical int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.job_log WHERE request_id = $1 AND status = 'CRITICAL'`, id).Scan(&critical))
	require.Equal(t, 1, critical, "the killed run's job is closed as CRITICAL")
}

// An agent killed in the middle of an inserter's batches: the committed
// batches stay, the interrupted one is rolled back, and the recovered
// request carries on from last_value: nothing lost, nothing doubled.
func TestAgentKilledMidBatch(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.feed (id bigint PRIMARY KEY, at timestamptz NOT NULL)`)
	e.exec(e.app, `INSERT INTO public.feed SELECT g, '2024-01-01 00:00+00'::timestamptz + ((g + 1) / 2) * interval '1 second' FROM generate_series(1, 1500) g`)
	e.exec(e.app, `GRANT SELECT ON public.feed TO `+replRole)
	cmd := e.startAgentProcess()
	e.done(`SELECT mimeo.inserter_maker('public.feed', 'at', $1, p_boundary => '0', p_pulldata => false)`, e.dblink)
	// p_pulldata false starts after the source's now(): start over from
	// the beginning instead, slowly and in small batches.
	e.exec(e.dst, `UPDATE mimeo.refresh_config_inserter SET batch_limit = 100, last_value = NULL, condition = $$pg_sleep(0.001)::text = ''$$`)
	id := e.request(`SELECT mimeo.refresh_inserter('public.feed')`)

	// Kill once a few batches have committed.
	require.Eventually(t, func() bool { return e.count("public.feed") >= 300 }, 60*time.Second, 5*time.Millisecond)
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	_ = cmd.Wait()
	copied := e.count("public.feed")
	require.Less(t, copied, 1500, "killed before the end")
	require.Equal(t, 0, copied%2, "batches end on whole ties")

	e.exec(e.dst, `UPDATE mimeo.refresh_config_inserter SET condition = NULL`)
	e.startAgent(e.config())
	o := e.await(id)
	require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
	e.requireSame("public.feed", "public.feed")
}

// A source runs at most its dblink_mapping.max_runs requests at once, over
// all agents, however many workers are free; other sources are not held
// back by it.
func TestPerSourceRunLimit(t *testing.T) {
	t.Parallel()
	e := setup(t)
	var tables []string
	for i := range 20 {
		tbl := fmt.Sprintf(`public."lim %02d"`, i)
		e.createItems(tbl, 100)
		tables = append(tables, tbl)
	}
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET max_runs = 2 WHERE data_source_id = $1`, e.dblink)
	// Three agents of one worker each: three could run at once, and only
	// agents that claim side by side can reach the limit.
	cfg := e.config()
	cfg.Workers = 1
	for range 3 {
		e.startAgent(cfg)
	}
	for _, tbl := range tables {
		e.request(`SELECT mimeo.snapshot_maker($1, $2, p_pulldata => false)`, tbl, e.dblink)
	}
	require.Eventually(t, func() bool {
		return e.count(`(SELECT 1 FROM mimeo.request WHERE status IN ('queued', 'running')) q`) == 0
	}, 60*time.Second, 50*time.Millisecond)
	for _, tbl := range tables {
		e.slowSourceBy(tbl, "0.004") // 0.4 s a run
	}
	for _, tbl := range tables {
		e.request(`SELECT mimeo.refresh_snap($1)`, tbl)
	}
	require.Eventually(t, func() bool {
		return e.count(`(SELECT 1 FROM mimeo.request WHERE status IN ('queued', 'running')) q`) == 0
	}, 90*time.Second, 100*time.Millisecond)
	var overlap, done, agents int
	require.NoError(t, e.dst.QueryRow(e.ctx, `
SELECT max((SELECT count(*) FROM mimeo.request q WHERE q.action = 'refresh_snap'
            AND q.started_at <= r.started_at AND q.finished_at > r.started_at)),
       count(*) FILTER (WHERE r.status = 'done'), count(DISTINCT r.agent_id)
FROM mimeo.request r WHERE r.action = 'refresh_snap'`).Scan(&overlap, &done, &agents))
	require.Equal(t, 20, done)
	require.Equal(t, 2, overlap, "at most max_runs at once, and the limit is used")
	require.GreaterOrEqual(t, agents, 2, "the agents shared the work")
	for _, tbl := range tables {
		e.requireSame(tbl, tbl)
	}
}

// An agent killed (SIGKILL) again and again while it drains a dml or
// logdel queue, the source reading a batch ahead of the destination, loses
// and doubles nothing: the next agent finishes the request, the copy is
// exact and the queue empty.
func TestAgentKilledMidDrain(t *testing.T) {
	t.Parallel()
	for _, typ := range []string{"dml", "logdel"} {
		t.Run(typ, func(t *testing.T) {
			t.Parallel()
			e := setup(t)
			e.exec(e.app, `CREATE TABLE public.t (id int PRIMARY KEY, v int)`)
			e.exec(e.app, `INSERT INTO public.t SELECT g, g FROM generate_series(1, 400) g`)
			e.prepareTriggers("public.t")
			cmd := e.startAgentProcess()
			e.done(`SELECT mimeo.`+typ+`_maker('public.t', $1)`, e.dblink)
			e.exec(e.app, `UPDATE t SET v = -v`)
			e.exec(e.app, `DELETE FROM t WHERE id % 7 = 0`)
			e.exec(e.app, `INSERT INTO t SELECT g, -g FROM generate_series(401, 500) g`)
			// Small batches, each slowed on the source, so that kills land
			// between and inside them.
			e.exec(e.dst, `UPDATE mimeo.refresh_config_`+typ+` SET batch_limit = 20, condition = $$pg_sleep(0.0002)::text = ''$$`)
			live := "public.t"
			if typ == "logdel" {
				live = "(SELECT id, v FROM public.t WHERE mimeo_source_deleted IS NULL)"
			}
			applied := func() int {
				var n int
				require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM `+live+` t WHERE v < 0`).Scan(&n))
				return n
			}
			id := e.request(`SELECT mimeo.refresh_` + typ + `('public.t')`)
			// Two kills: the third attempt (a request gets three) finishes.
			for kill, progress := range []int{60, 200} {
				require.Eventually(t, func() bool { return applied() >= progress }, 60*time.Second, 2*time.Millisecond, "kill %d", kill+1)
				require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
				_ = cmd.Wait()
				if kill == 0 {
					cmd = e.startAgentProcess()
				}
			}
			require.Less(t, applied(), 443, "killed before the end")

			e.exec(e.dst, `UPDATE mimeo.refresh_config_`+typ+` SET condition = NULL`)
			e.startAgent(e.config())
			o := e.await(id)
			require.Equal(t, "done", o.Status, "error: %v", deref(o.Error))
			require.Equal(t, checksum(t, e.ctx, e.src, "public.t"), checksum(t, e.ctx, e.dst, live))
			if typ == "logdel" {
				var deleted int
				require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM public.t WHERE mimeo_source_deleted IS NOT NULL`).Scan(&deleted))
				require.Equal(t, 57, deleted, "every deleted row is kept, once")
			}
			var queued int
			q := e.queueOf(typ)
			require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM `+q).Scan(&queued))
			require.Zero(t, queued, "queue drained")
		})
	}
}

// queueOf is the source queue of the table public.t replicated by typ.
func (e *env) queueOf(typ string) string {
	e.t.Helper()
	var q string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `SELECT queue_table FROM mimeo.refresh_config_`+typ+` WHERE dest_table = 'public.t'`).Scan(&q))
	return q
}
