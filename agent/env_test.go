package agent_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
	"github.com/mimeo-dev/mimeo/internal/pgtest"
	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

// Least-privilege roles, as a DBA would set them up: the agent owns the
// destination database (no superuser), the replication role may only
// SELECT what it is granted, the application role writes the source.
const (
	agentRole = "mimeo_agent"
	agentPass = "agent pw's"
	replRole  = "mimeo_repl"
	replPass  = "repl-secret"
	appRole   = "app"
	// The logical type's replication role: REPLICATION, and a member of
	// the application role (so it owns what publications need); the
	// least-privilege test uses a role of its own.
	logicalRole = "mimeo_logical"
	logicalPass = "logical pw"
	template    = "mimeo_template"
)

// Roles a DBA may hand destination objects to: the agent is a member of
// keeperRole (whose name needs quoting) and not of strangerRole.
const (
	keeperRole   = "Snap Keeper"
	strangerRole = "stranger"
)

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, func(src, dst *pgtest.Cluster) error {
		ctx := context.Background()
		if err := pgtest.CreateRole(ctx, dst, agentRole, agentPass, "LOGIN"); err != nil {
			return err
		}
		if err := pgtest.CreateRole(ctx, dst, "reader", "", "NOLOGIN"); err != nil {
			return err
		}
		if err := pgtest.CreateRole(ctx, dst, "operator", "", "LOGIN"); err != nil {
			return err
		}
		if err := pgtest.CreateRole(ctx, dst, keeperRole, "", "NOLOGIN"); err != nil {
			return err
		}
		if err := pgtest.CreateRole(ctx, dst, strangerRole, "", "NOLOGIN"); err != nil {
			return err
		}
		if err := dst.Exec(ctx, "postgres", "GRANT "+pgx.Identifier{keeperRole}.Sanitize()+" TO "+agentRole); err != nil {
			return err
		}
		if err := pgtest.CreateRole(ctx, src, replRole, replPass, "LOGIN"); err != nil {
			return err
		}
		if err := pgtest.CreateRole(ctx, src, appRole, "", "LOGIN"); err != nil {
			return err
		}
		if err := pgtest.CreateRole(ctx, src, logicalRole, logicalPass, "LOGIN REPLICATION"); err != nil {
			return err
		}
		if err := src.Exec(ctx, "postgres", "GRANT "+appRole+" TO "+logicalRole); err != nil {
			return err
		}
		if err := dst.CreateDatabase(ctx, template, "", agentRole); err != nil {
			return err
		}
		conn, err := pgx.Connect(ctx, dst.ConnString(template, agentRole, ""))
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		_, err = mimeosql.Install(ctx, conn)
		return err
	}))
}

// env is one test's pair of fresh databases.
type env struct {
	t      *testing.T
	ctx    context.Context
	srcDB  string
	dstDB  string
	src    *pgxpool.Pool // superuser on the source database
	app    *pgxpool.Pool // the application role on the source database
	dst    *pgxpool.Pool // the agent role on the destination database
	dblink int
}

func setup(t *testing.T) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	src, dst := pgtest.Source(), pgtest.Destination()
	e := &env{t: t, ctx: ctx}
	e.srcDB = src.NewDatabase(t, "", appRole)
	e.dstDB = dst.NewDatabase(t, template, agentRole)
	e.src = e.pool(src.ConnString(e.srcDB, src.Superuser, ""))
	e.app = e.pool(src.ConnString(e.srcDB, appRole, ""))
	e.dst = e.pool(dst.ConnString(e.dstDB, agentRole, ""))
	// The agent reaches the source over TCP with a SCRAM password.
	require.NoError(t, e.dst.QueryRow(ctx, `
INSERT INTO mimeo.dblink_mapping (data_source, username, pwd) VALUES ($1, $2, $3) RETURNING data_source_id`,
		e.sourceInfo(src.Port), replRole, replPass).Scan(&e.dblink))
	return e
}

func (e *env) sourceInfo(port int) string {
	return fmt.Sprintf("host=127.0.0.1 port=%d dbname=%s sslmode=disable", port, e.srcDB)
}

func (e *env) pool(connString string) *pgxpool.Pool {
	p, err := pgxpool.New(e.ctx, connString)
	require.NoError(e.t, err)
	e.t.Cleanup(p.Close)
	return p
}

// exec runs statements on a pool and fails the test on error.
func (e *env) exec(p *pgxpool.Pool, sql string, args ...any) {
	e.t.Helper()
	_, err := p.Exec(e.ctx, sql, args...)
	require.NoError(e.t, err, sql)
}

// config is a fast-moving agent configuration for tests.
func (e *env) config() agent.Config {
	return agent.Config{
		DatabaseURL:       pgtest.Destination().ConnString(e.dstDB, agentRole, ""),
		Workers:           2,
		PollInterval:      200 * time.Millisecond,
		HeartbeatInterval: 100 * time.Millisecond,
		AgentTimeout:      5 * time.Second,
		MaxAttempts:       3,
		ShutdownTimeout:   5 * time.Second,
		SourceIdleTimeout: time.Minute,
		ConnectTimeout:    5 * time.Second,
		LogLevel:          "info",
		LogFormat:         "text",
		LogicalStreaming:  true, // as its env default
		// Partitions and the slot's WAL are checked each second, not each 10.
		LogicalCheckInterval: time.Second,
	}
}

// startAgent runs an agent until the test ends, or until stop is called.
func (e *env) startAgent(cfg agent.Config) (stop func()) {
	e.t.Helper()
	a, err := agent.New(e.ctx, cfg, hclog.New(&hclog.LoggerOptions{Output: testWriter{e.t}, Level: hclog.Debug}))
	require.NoError(e.t, err)
	ctx, cancel := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = a.Run(ctx) })
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait(); a.Close() }) }
	e.t.Cleanup(stop)
	return stop
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// request returns the id a request-making SQL function returned.
func (e *env) request(sql string, args ...any) int64 {
	e.t.Helper()
	var id int64
	require.NoError(e.t, e.dst.QueryRow(e.ctx, sql, args...).Scan(&id), sql)
	return id
}

// outcome is a finished request.
type outcome struct {
	Status  string
	Rows    *int64
	Message *string
	Error   *string
	JobID   *int64
}

// await polls until the request has ended.
func (e *env) await(id int64) outcome {
	e.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var o outcome
		require.NoError(e.t, e.dst.QueryRow(e.ctx,
			`SELECT status, rows_moved, message, error, job_id FROM mimeo.request WHERE id = $1`, id).
			Scan(&o.Status, &o.Rows, &o.Message, &o.Error, &o.JobID))
		if o.Status != "queued" && o.Status != "running" {
			return o
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("request %d still %s after 60s", id, o.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// done runs a request-making statement and requires it to end done.
func (e *env) done(sql string, args ...any) outcome {
	e.t.Helper()
	o := e.await(e.request(sql, args...))
	require.Equal(e.t, "done", o.Status, "error: %v", deref(o.Error))
	return o
}

// failed runs a request-making statement and requires it to fail; it
// returns the error text.
func (e *env) failed(sql string, args ...any) string {
	e.t.Helper()
	o := e.await(e.request(sql, args...))
	require.Equal(e.t, "failed", o.Status, "message: %v", deref(o.Message))
	require.NotNil(e.t, o.Error)
	return *o.Error
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// checksum is a table's row count and an ordered digest of its rows.
func checksum(t *testing.T, ctx context.Context, p *pgxpool.Pool, table string) string {
	t.Helper()
	var n int64
	var digest string
	require.NoError(t, p.QueryRow(ctx, fmt.Sprintf(
		`SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM %s x`, table)).
		Scan(&n, &digest))
	return strconv.FormatInt(n, 10) + ":" + digest
}

// requireSame asserts the destination holds exactly the source's rows.
func (e *env) requireSame(srcTable, dstTable string) {
	e.t.Helper()
	require.Equal(e.t, checksum(e.t, e.ctx, e.src, srcTable), checksum(e.t, e.ctx, e.dst, dstTable),
		"destination %s differs from source %s", dstTable, srcTable)
}

// writeAndWaitStats runs writes as the application role and waits until
// the source's statistics show them (they are flushed asynchronously).
func (e *env) writeAndWaitStats(table string, sql ...string) {
	e.t.Helper()
	before := e.stats(table)
	for _, q := range sql {
		e.exec(e.app, q)
	}
	deadline := time.Now().Add(15 * time.Second)
	for e.stats(table) == before {
		if time.Now().After(deadline) {
			e.t.Fatalf("statistics of %s did not change", table)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *env) stats(table string) string {
	var s string
	err := e.src.QueryRow(e.ctx, `SELECT concat_ws(',', n_tup_ins, n_tup_upd, n_tup_del) FROM pg_stat_all_tables WHERE relid = $1::regclass`, table).Scan(&s)
	if errors.Is(err, pgx.ErrNoRows) {
		return ""
	}
	require.NoError(e.t, err)
	return s
}

// jobSteps returns "action: message" for each step of a job.
func (e *env) jobSteps(jobID int64) []string {
	rows, err := e.dst.Query(e.ctx, `SELECT action || ': ' || coalesce(message, '') FROM mimeo.job_detail WHERE job_id = $1 ORDER BY step_id`, jobID)
	require.NoError(e.t, err)
	steps, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(e.t, err)
	return steps
}
