package queue_test

import (
	"context"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
	"github.com/mimeo-dev/mimeo/queue"
	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

const template = "queue_template"

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, func(_, dst *pgtest.Cluster) error {
		ctx := context.Background()
		if err := dst.CreateDatabase(ctx, template, "", ""); err != nil {
			return err
		}
		conn, err := dst.Connect(ctx, template)
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		_, err = mimeosql.Install(ctx, conn)
		return err
	}))
}

func setup(t *testing.T) (context.Context, *pgxpool.Pool) {
	ctx := context.Background()
	db := pgtest.Destination().NewDatabase(t, template, "")
	pool, err := pgxpool.New(ctx, pgtest.Destination().ConnString(db, "postgres", ""))
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return ctx, pool
}

// registerAgent inserts an agent row; with a lock connection it is alive.
func registerAgent(t *testing.T, ctx context.Context, pool *pgxpool.Pool, alive bool) int64 {
	var id int64
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO mimeo.agent (host, pid, version, schema_version) VALUES ('test', 1, 'x', $1) RETURNING id`,
		mimeosql.Version).Scan(&id))
	if alive {
		conn, err := pool.Acquire(ctx)
		require.NoError(t, err)
		_, err = conn.Exec(ctx, `SELECT pg_advisory_lock(mimeo.agent_lock_key(), $1::int)`, id)
		require.NoError(t, err)
		t.Cleanup(func() { _ = conn.Hijack().Close(ctx) })
	}
	return id
}

func TestConcurrentClaimsAreDisjoint(t *testing.T) {
	t.Parallel()
	ctx, pool := setup(t)
	for i := range 50 {
		_, err := queue.Enqueue(ctx, pool, "refresh_snap", "public.t"+string(rune('a'+i%26)), map[string]any{"debug": false})
		require.NoError(t, err)
	}
	var mu sync.Mutex
	seen := map[int64]int{}
	var wg sync.WaitGroup
	for range 5 {
		agentID := registerAgent(t, ctx, pool, false)
		wg.Go(func() {
			for {
				reqs, err := queue.Claim(ctx, pool, agentID, 3)
				if err != nil || len(reqs) == 0 {
					return
				}
				mu.Lock()
				for _, r := range reqs {
					seen[r.ID]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	require.Len(t, seen, 50)
	for id, n := range seen {
		require.Equal(t, 1, n, "request %d claimed once", id)
	}
}

func TestFinishOnlyByTheHolder(t *testing.T) {
	t.Parallel()
	ctx, pool := setup(t)
	id, err := queue.Enqueue(ctx, pool, "refresh_snap", "public.t", nil)
	require.NoError(t, err)
	holder := registerAgent(t, ctx, pool, false)
	req, err := queue.ClaimID(ctx, pool, holder, id)
	require.NoError(t, err)
	_, err = queue.ClaimID(ctx, pool, holder+1, id)
	require.ErrorIs(t, err, queue.ErrNotClaimed)

	ok, err := queue.Finish(ctx, pool, holder+1, req.ID, queue.Outcome{Status: queue.StatusDone})
	require.NoError(t, err)
	require.False(t, ok, "another agent cannot finish it")
	ok, err = queue.Finish(ctx, pool, holder, req.ID, queue.Outcome{Status: queue.StatusFailed, Error: "boom"})
	require.NoError(t, err)
	require.True(t, ok)
	var status, msg string
	require.NoError(t, pool.QueryRow(ctx, `SELECT status, error FROM mimeo.request WHERE id = $1`, id).Scan(&status, &msg))
	require.Equal(t, []string{"failed", "boom"}, []string{status, msg})
}

// A dead agent's running requests go back to the queue, until they have
// used up their attempts; a live agent's are left alone.
func TestRecoverOrphans(t *testing.T) {
	t.Parallel()
	ctx, pool := setup(t)
	live := registerAgent(t, ctx, pool, true)
	dead := registerAgent(t, ctx, pool, false)
	ids := make([]int64, 3)
	for i := range ids {
		var err error
		ids[i], err = queue.Enqueue(ctx, pool, "refresh_snap", "public.t", nil)
		require.NoError(t, err)
	}
	_, err := queue.ClaimID(ctx, pool, live, ids[0])
	require.NoError(t, err)
	_, err = queue.ClaimID(ctx, pool, dead, ids[1])
	require.NoError(t, err)
	_, err = queue.ClaimID(ctx, pool, dead, ids[2])
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `UPDATE mimeo.request SET attempts = 3 WHERE id = $1`, ids[2])
	require.NoError(t, err)

	rec, err := queue.Recover(ctx, pool, time.Minute, 3)
	require.NoError(t, err)
	require.Equal(t, []int64{ids[1]}, rec.Requeued)
	require.Equal(t, []int64{ids[2]}, rec.Failed)

	rows, err := pool.Query(ctx, `SELECT status FROM mimeo.request ORDER BY id`)
	require.NoError(t, err)
	statuses, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Equal(t, []string{"running", "queued", "failed"}, statuses)
	var errText string
	require.NoError(t, pool.QueryRow(ctx, `SELECT error FROM mimeo.request WHERE id = $1`, ids[2]).Scan(&errText))
	require.Contains(t, errText, "stopped while running this request")
	var status string
	require.NoError(t, pool.QueryRow(ctx, `SELECT status FROM mimeo.agent WHERE id = $1`, dead).Scan(&status))
	require.Equal(t, "dead", status, "the dead agent is marked so; its row stays for a while")
	require.NoError(t, pool.QueryRow(ctx, `SELECT status FROM mimeo.agent WHERE id = $1`, live).Scan(&status))
	require.Equal(t, "running", status)
}

// The database itself refuses to let an agent of another schema version
// claim (or record) a request: an agent left running through an upgrade
// runs nothing.
func TestClaimRefusesAnAgentOfAnotherSchemaVersion(t *testing.T) {
	t.Parallel()
	ctx, pool := setup(t)
	var old int64
	require.NoError(t, pool.QueryRow(ctx, `INSERT INTO mimeo.agent (host, pid, version) VALUES ('old', 1, '0.3.0') RETURNING id`).Scan(&old))
	id, err := queue.Enqueue(ctx, pool, "refresh_snap", "public.t", nil)
	require.NoError(t, err)
	_, err = queue.Claim(ctx, pool, old, 1)
	require.ErrorContains(t, err, "agent "+strconv.FormatInt(old, 10)+" runs for mimeo schema 0.3.0, but this database has schema "+mimeosql.Version)
	_, err = queue.InsertRunning(ctx, pool, old, "refresh_snap", "public.t", nil)
	require.ErrorContains(t, err, "it may not run requests")
	var status string
	require.NoError(t, pool.QueryRow(ctx, `SELECT status FROM mimeo.request WHERE id = $1`, id).Scan(&status))
	require.Equal(t, queue.StatusQueued, status)

	current := registerAgent(t, ctx, pool, true)
	reqs, err := queue.Claim(ctx, pool, current, 1)
	require.NoError(t, err)
	require.Len(t, reqs, 1)
}
