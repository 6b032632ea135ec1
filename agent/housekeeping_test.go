package agent_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
)

// Finished requests, job logs (with their steps), validation results and
// stopped agents' rows older than MIMEO_RETENTION go, in batches; unfinished and recent ones stay.
func TestRetentionClearsOldRowsOnly(t *testing.T) {
	t.Parallel()
	e := setup(t)
	old := `now() - interval '40 days'`
	// 2500 old finished requests: more than one batch.
	e.exec(e.dst, `INSERT INTO mimeo.request (action, status, requested_at, started_at, finished_at, message)
SELECT 'refresh_snap', CASE WHEN g % 2 = 0 THEN 'done' ELSE 'failed' END, `+old+`, `+old+`, `+old+`, 'old'
FROM generate_series(1, 2500) g`)
	// An old request not finished (the agent may run it meanwhile: it ends
	// now, so it stays either way).
	var running, recent int64
	require.NoError(t, e.dst.QueryRow(e.ctx, `INSERT INTO mimeo.request (action, status, requested_at, message)
VALUES ('refresh_snap', 'queued', `+old+`, 'not finished') RETURNING id`).Scan(&running))
	require.NoError(t, e.dst.QueryRow(e.ctx, `INSERT INTO mimeo.request (action, status, requested_at, started_at, finished_at, message)
VALUES ('refresh_snap', 'done', now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', 'recent') RETURNING id`).Scan(&recent))
	e.exec(e.dst, `WITH j AS (
    INSERT INTO mimeo.job_log (job_name, start_time, end_time, status)
    SELECT 'old job', `+old+`, `+old+`, 'OK' FROM generate_series(1, 1500) RETURNING job_id)
INSERT INTO mimeo.job_detail (job_id, step_id, action, status) SELECT job_id, 1, 'step', 'OK' FROM j`)
	e.exec(e.dst, `INSERT INTO mimeo.job_log (job_name, start_time, status) VALUES ('old running job', `+old+`, 'RUNNING')`)
	e.exec(e.dst, `INSERT INTO mimeo.job_log (job_name, start_time, end_time, status) VALUES ('recent job', now(), now(), 'OK')`)
	// A table's newest request and newest successful job stay, however old:
	// refresh_status shows its last error and last success from them.
	var lastReq int64
	require.NoError(t, e.dst.QueryRow(e.ctx, `INSERT INTO mimeo.request (action, dest_table, status, requested_at, started_at, finished_at, error)
SELECT 'refresh_snap', 'public.monthly', 'failed', `+old+`, `+old+`, `+old+`, 'old failure' FROM generate_series(1, 3) RETURNING id`).Scan(&lastReq))
	e.exec(e.dst, `INSERT INTO mimeo.job_log (job_name, dest_table, start_time, end_time, status)
SELECT 'monthly job', 'public.monthly', `+old+`, `+old+`, s FROM unnest(array['OK', 'OK', 'CRITICAL']) s`)
	e.exec(e.dst, `INSERT INTO mimeo.agent (host, pid, version, status, started_at, last_seen) VALUES ('gone', 1, 'x', 'stopped', `+old+`, `+old+`)`)
	// Checks: old results go but each table's newest of each kind; a newer
	// check does not push out the table's last successful refresh.
	e.exec(e.dst, `INSERT INTO mimeo.validation (dest_table, kind, ok, checked_at, detail)
SELECT CASE WHEN g % 2 = 0 THEN 'public.monthly' END, k, true, `+old+`, 'old check'
FROM generate_series(1, 1200) g, unnest(array['rowcount', 'checksum']) k`)
	e.exec(e.dst, `INSERT INTO mimeo.job_log (job_name, dest_table, start_time, end_time, status)
SELECT 'Validate: public.monthly', 'public.monthly', `+old+`, `+old+`, 'OK' FROM generate_series(1, 3)`)
	e.exec(e.dst, `INSERT INTO mimeo.request (action, dest_table, status, requested_at, started_at, finished_at, message)
SELECT 'validate', 'public.monthly', 'done', `+old+`, `+old+`, `+old+`, 'old check' FROM generate_series(1, 3)`)

	// Refresh runs that moved nothing go after MIMEO_NOOP_RETENTION; those
	// that moved rows, and a table's newest, stay.
	twoDays := `now() - interval '2 days'`
	e.exec(e.dst, `INSERT INTO mimeo.request (action, dest_table, status, requested_at, started_at, finished_at, rows_moved, message)
SELECT 'refresh_snap', 'public.daily', 'done', `+twoDays+`, `+twoDays+`, `+twoDays+`, CASE WHEN g = 2 THEN 5 ELSE 0 END, 'noop ' || g
FROM generate_series(1, 4) g`)
	e.exec(e.dst, `INSERT INTO mimeo.job_log (job_name, dest_table, start_time, end_time, status, rows_moved)
SELECT 'Refresh Snap: public.daily', 'public.daily', `+twoDays+`, `+twoDays+`, 'OK', CASE WHEN g = 2 THEN 5 ELSE 0 END
FROM generate_series(1, 4) g`)
	cfg := e.config()
	cfg.NoopRetention = agent.RetentionPeriod(24 * time.Hour)
	cfg.Retention = agent.RetentionPeriod(30 * 24 * time.Hour)
	cfg.HousekeepingInterval = 100 * time.Millisecond
	e.startAgent(cfg)

	count := func(q string) int {
		var n int
		require.NoError(t, e.dst.QueryRow(e.ctx, q).Scan(&n))
		return n
	}
	require.Eventually(t, func() bool {
		return count(`SELECT count(*) FROM mimeo.request WHERE message IN ('old', 'old check')`) == 0 &&
			count(`SELECT count(*) FROM mimeo.job_log WHERE job_name IN ('old job', 'Validate: public.monthly')`) == 0 &&
			count(`SELECT count(*) FROM mimeo.validation`) == 2
	}, 30*time.Second, 50*time.Millisecond, "old finished requests, job logs and checks are cleared")
	require.Equal(t, 2, count(`SELECT count(DISTINCT kind) FROM mimeo.validation WHERE dest_table = 'public.monthly'`), "a table's newest check of each kind stays")
	require.Equal(t, 0, count(`SELECT count(*) FROM mimeo.job_detail d LEFT JOIN mimeo.job_log j USING (job_id) WHERE j.job_id IS NULL`), "steps go with their job")
	require.Eventually(t, func() bool {
		return count(`SELECT count(*) FROM mimeo.request WHERE dest_table = 'public.daily'`) == 2
	}, 10*time.Second, 50*time.Millisecond)
	require.Equal(t, 2, count(`SELECT count(*) FROM mimeo.request WHERE dest_table = 'public.daily' AND message IN ('noop 2', 'noop 4')`),
		"the run that moved rows and the newest stay")
	require.Equal(t, 2, count(`SELECT count(*) FROM mimeo.job_log WHERE dest_table = 'public.daily'`))
	require.Equal(t, 1, count(`SELECT count(*) FROM mimeo.job_log WHERE dest_table = 'public.daily' AND rows_moved = 5`))
	require.Equal(t, 2, count(`SELECT count(*) FROM mimeo.request WHERE id IN (`+fmt.Sprint(running)+`, `+fmt.Sprint(recent)+`)`), "unfinished and recent requests stay")
	require.Equal(t, 2, count(`SELECT count(*) FROM mimeo.job_log WHERE job_name IN ('old running job', 'recent job')`))
	require.Equal(t, 0, count(`SELECT count(*) FROM mimeo.agent WHERE host = 'gone'`))
	require.Equal(t, 1, count(`SELECT count(*) FROM mimeo.request WHERE dest_table = 'public.monthly'`), "a table's newest request stays")
	require.Equal(t, 2, count(`SELECT count(*) FROM mimeo.job_log WHERE dest_table = 'public.monthly'`), "its newest OK job (and the failure after it) stay")
	require.Equal(t, 1, count(`SELECT count(*) FROM mimeo.agent WHERE status = 'running'`), "the live agent stays")
}

func TestRetentionSetting(t *testing.T) {
	for in, want := range map[string]time.Duration{"30d": 30 * 24 * time.Hour, "0.5d": 12 * time.Hour, "36h": 36 * time.Hour, "0": 0} {
		var r agent.RetentionPeriod
		require.NoError(t, r.EnvDecode(in), in)
		require.Equal(t, want, time.Duration(r), in)
	}
	var r agent.RetentionPeriod
	require.ErrorContains(t, r.EnvDecode("thirty days"), "MIMEO_RETENTION")
}
