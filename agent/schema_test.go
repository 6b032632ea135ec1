package agent_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

// pretendUpgrade makes the destination claim a newer schema, as an
// upgrade by a later release would.
func (e *env) pretendUpgrade(version string) {
	e.exec(e.dst, `CREATE OR REPLACE FUNCTION mimeo.installed_version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '`+version+`'::text $$`)
}

// runAgent runs an agent and reports what Run returned.
func (e *env) runAgent(cfg agent.Config) <-chan error {
	e.t.Helper()
	a, err := agent.New(e.ctx, cfg, hclog.New(&hclog.LoggerOptions{Output: testWriter{e.t}, Level: hclog.Debug}))
	require.NoError(e.t, err)
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Go(func() { done <- a.Run(ctx) })
	e.t.Cleanup(func() { cancel(); wg.Wait(); a.Close() })
	return done
}

// A running agent that finds the schema upgraded under it stops claiming,
// says so in its row, and returns ErrSchemaChanged (the CLI exits non-zero
// for a supervisor to start the new binary). A request queued meanwhile
// stays for an agent of the new release.
func TestAgentStopsWhenTheSchemaChangesUnderIt(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	cfg := e.config()
	done := e.runAgent(cfg)
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)

	e.pretendUpgrade("9.9.9")
	select {
	case err := <-done:
		require.ErrorIs(t, err, agent.ErrSchemaChanged)
		require.ErrorContains(t, err, "the mimeo schema is now 9.9.9 but this agent runs for "+mimeosql.Version)
	case <-time.After(20 * time.Second):
		t.Fatal("the agent kept running against a schema it does not know")
	}
	var status, detail string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT status, status_detail FROM mimeo.agent ORDER BY id DESC LIMIT 1`).Scan(&status, &detail))
	require.Equal(t, "stopped", status)
	require.Contains(t, detail, "the mimeo schema is now 9.9.9")
	require.Contains(t, detail, "run mimeo-agent 9.9.9 instead")

	id := e.request(`SELECT mimeo.refresh_snap('public.items')`)
	time.Sleep(300 * time.Millisecond)
	var reqStatus string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT status FROM mimeo.request WHERE id = $1`, id).Scan(&reqStatus))
	require.Equal(t, "queued", reqStatus)

	// An agent of this release refuses to start at all.
	_, err := agent.New(e.ctx, cfg, nil)
	require.ErrorIs(t, err, agent.ErrSchemaMissing)
	require.ErrorContains(t, err, "found 9.9.9")
}

// Every run holds the schema lock shared, so an upgrade (which takes it
// exclusively) waits for the runs in flight; a run that gets the lock
// after an upgrade committed finds the new version and goes back to the
// queue instead of running.
func TestRunsHoldTheSchemaLock(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	started := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	cfg := e.config()
	cfg.FaultHook = func(point string) error {
		if point == "run started" {
			once.Do(func() { close(started); <-release })
		}
		return nil
	}
	done := e.runAgent(cfg)
	id := e.request(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	<-started

	upgrade, err := e.dst.Begin(e.ctx)
	require.NoError(t, err)
	defer func() { _ = upgrade.Rollback(e.ctx) }()
	var free bool
	require.NoError(t, upgrade.QueryRow(e.ctx, `SELECT pg_try_advisory_xact_lock(mimeo.schema_lock_key())`).Scan(&free))
	require.False(t, free, "an upgrade must wait for the run in flight")
	close(release)
	require.Equal(t, "done", e.await(id).Status)

	// The upgrade now gets the lock; a run queued meanwhile waits for it,
	// then sees the new version and is handed back to the queue.
	_, err = upgrade.Exec(e.ctx, `SELECT pg_advisory_xact_lock(mimeo.schema_lock_key())`)
	require.NoError(t, err)
	_, err = upgrade.Exec(e.ctx, `CREATE OR REPLACE FUNCTION mimeo.installed_version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '9.9.9'::text $$`)
	require.NoError(t, err)
	next := e.request(`SELECT mimeo.refresh_snap('public.items')`)
	time.Sleep(500 * time.Millisecond) // claimed, and waiting for the lock
	require.NoError(t, upgrade.Commit(e.ctx))
	select {
	case err := <-done:
		require.ErrorIs(t, err, agent.ErrSchemaChanged)
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop")
	}
	var status string
	var jobs int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT status FROM mimeo.request WHERE id = $1`, next).Scan(&status))
	require.Equal(t, "queued", status, "the request waits for an agent of the new release")
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.job_log WHERE request_id = $1 AND status = 'OK'`, next).Scan(&jobs))
	require.Zero(t, jobs, "it did not run")
}

// A timed-out wait says what is true now: no agent has ever run, or the
// last one stopped (and when), or agents are alive but busy; the request
// stays queued and will run.
func TestWaitTimeoutTellsTheTruth(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	id := e.request(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	msg := e.sqlError(`SELECT mimeo.wait($1, '50 ms')`, id)
	require.Contains(t, msg, "no mimeo-agent is running (none has ever registered with this database)")
	require.Contains(t, msg, "it stays queued and runs when an agent takes it")

	stop := e.startAgent(e.config())
	require.Equal(t, "done", e.await(id).Status)
	stop()
	id = e.request(`SELECT mimeo.refresh_snap('public.items')`)
	msg = e.sqlError(`SELECT mimeo.wait($1, '50 ms')`, id)
	require.Contains(t, msg, "no mimeo-agent is running (the last one, agent")
	require.Contains(t, msg, "stopped cleanly")
	require.NotContains(t, msg, "none has ever registered")

	// An agent alive but busy: its only worker is held in another run.
	held := make(chan struct{})
	t.Cleanup(func() {
		select {
		case <-held:
		default:
			close(held)
		}
	})
	cfg := e.config()
	cfg.Workers = 1
	cfg.FaultHook = func(point string) error {
		if point == "run started" {
			<-held
		}
		return nil
	}
	e.startAgent(cfg)
	require.Eventually(t, func() bool {
		var running bool
		return e.dst.QueryRow(e.ctx, `SELECT status = 'running' FROM mimeo.request WHERE id = $1`, id).Scan(&running) == nil && running
	}, 10*time.Second, 20*time.Millisecond)
	later := e.request(`SELECT mimeo.refresh_snap('public.items')`)
	msg = e.sqlError(`SELECT mimeo.wait($1, '50 ms')`, later)
	require.Contains(t, msg, "1 agent is alive")
	require.Contains(t, msg, "busy with 1 running and 0 queued ahead of it")
	msg = e.sqlError(`SELECT mimeo.wait($1, '50 ms')`, id)
	require.Contains(t, msg, "it is running on agent")
	close(held)
	require.Equal(t, "done", e.await(later).Status, "the timed-out request still ran")
}

// An agent killed with SIGKILL is dead at once for a waiter, whatever its
// last heartbeat says: its session, and the liveness lock on it, are gone.
func TestWaitAfterTheAgentWasKilled(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	proc := e.startAgentProcess()
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	require.NoError(t, proc.Process.Kill())
	_ = proc.Wait()
	id := e.request(`SELECT mimeo.refresh_snap('public.items')`)
	require.Eventually(t, func() bool {
		msg := e.sqlError(`SELECT mimeo.wait($1, '10 ms')`, id)
		return strings.Contains(msg, "no mimeo-agent is running (the last one") && strings.Contains(msg, "died")
	}, 5*time.Second, 50*time.Millisecond, "a killed agent is not alive")
}

// CALL ..._wait commits between polls: while it waits, the waiting session
// holds back no vacuum (its xmin moves on), unlike a function that would
// hold one snapshot for the whole wait.
func TestCallWaitHoldsNoSnapshot(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	conn, err := e.dst.Acquire(e.ctx)
	require.NoError(t, err)
	defer conn.Release()
	var pid int32
	require.NoError(t, conn.QueryRow(e.ctx, `SELECT pg_backend_pid()`).Scan(&pid))
	waited := make(chan error, 1)
	go func() {
		_, err := conn.Exec(e.ctx, `CALL mimeo.snapshot_maker_wait('public.items', $1, p_timeout => '20 s')`, e.dblink)
		waited <- err
	}()
	require.Eventually(t, func() bool {
		var waiting bool
		return e.dst.QueryRow(e.ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND query LIKE 'CALL%')`, pid).Scan(&waiting) == nil && waiting
	}, 10*time.Second, 10*time.Millisecond)
	// A transaction that commits after the wait began: the waiter's xmin
	// must pass it (or be none), so vacuum may remove what it deletes.
	var xid int64
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT pg_current_xact_id()::text::bigint`).Scan(&xid))
	require.Eventually(t, func() bool {
		var past bool
		err := e.dst.QueryRow(e.ctx, `
SELECT backend_xmin IS NULL OR backend_xmin::text::bigint > $2
FROM pg_stat_activity WHERE pid = $1`, pid, xid%(1<<32)).Scan(&past)
		return err == nil && past
	}, 15*time.Second, 10*time.Millisecond, "the waiting CALL holds a snapshot from before the wait")

	e.startAgent(e.config())
	select {
	case err := <-waited:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("CALL did not return")
	}
	e.requireSame("public.items", "public.items")
	if errors.Is(e.ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("test ran out of time")
	}
}
