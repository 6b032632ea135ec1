package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/agent"
	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, func(src, dst *pgtest.Cluster) error {
		ctx := context.Background()
		if err := pgtest.CreateRole(ctx, dst, "mimeo_agent", "", "LOGIN"); err != nil {
			return err
		}
		return pgtest.CreateRole(ctx, src, "mimeo_repl", "pw", "LOGIN")
	}))
}

// cli runs the command line and returns its exit code and output.
func cli(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestCommandLine(t *testing.T) {
	ctx := context.Background()
	src, dst := pgtest.Source(), pgtest.Destination()
	srcDB := src.NewDatabase(t, "", "")
	dstDB := dst.NewDatabase(t, "", "mimeo_agent")
	url := dst.ConnString(dstDB, "mimeo_agent", "")
	t.Setenv("MIMEO_DATABASE_URL", "")

	code, _, stderr := cli("run")
	require.Equal(t, 1, code)
	require.Contains(t, stderr, "MIMEO_DATABASE_URL is not set")

	code, _, stderr = cli("run", "--database-url", url)
	require.Equal(t, exitSchema, code)
	require.Contains(t, stderr, "run mimeo-agent install")

	// A wrong password says so first, not the TLS attempt pgx made before.
	wrong := fmt.Sprintf("postgres://mimeo_agent:wrong@127.0.0.1:%d/%s", dst.Port, dstDB)
	for _, c := range []string{"install", "status", "run"} {
		code, _, stderr = cli(c, "--database-url", wrong)
		require.NotZero(t, code, c)
		require.Contains(t, stderr, `password authentication failed for user "mimeo_agent"`, c)
		require.NotContains(t, stderr, "tls", c)
		require.Equal(t, 1, strings.Count(stderr, "\n"), "%s: one line: %s", c, stderr)
	}

	code, stdout, _ := cli("install", "--database-url", url)
	require.Equal(t, 0, code)
	require.Contains(t, stdout, "installed mimeo")
	code, stdout, _ = cli("install", "--database-url", url)
	require.Equal(t, 0, code)
	require.Contains(t, stdout, "already installed")

	require.NoError(t, src.Exec(ctx, srcDB, `CREATE TABLE public.t (id int PRIMARY KEY, v text);
INSERT INTO public.t SELECT g, g::text FROM generate_series(1, 100) g;
GRANT SELECT ON public.t TO mimeo_repl`))
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, `INSERT INTO mimeo.dblink_mapping (data_source, username, pwd) VALUES ($1, 'mimeo_repl', 'pw')`,
		fmt.Sprintf("host=127.0.0.1 port=%d dbname=%s sslmode=disable", src.Port, srcDB))
	require.NoError(t, err)

	// Make the table with a daemon, then stop it: refresh needs none.
	cfg, err := agent.LoadConfig(ctx, mapLookuper{"MIMEO_DATABASE_URL": url, "MIMEO_POLL_INTERVAL": "100ms"})
	require.NoError(t, err)
	a, err := agent.New(ctx, cfg, nil)
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = a.Run(runCtx) })
	_, err = conn.Exec(ctx, `CALL mimeo.snapshot_maker_wait('public.t', 1, p_timeout => '30 s')`)
	require.NoError(t, err)
	stop()
	wg.Wait()
	a.Close()

	t.Setenv("MIMEO_DATABASE_URL", url)
	require.NoError(t, src.Exec(ctx, srcDB, `INSERT INTO public.t VALUES (101, 'new')`))
	// Statistics reach pg_stat_all_tables asynchronously: wait for them.
	srcConn, err := pgx.Connect(ctx, src.ConnString(srcDB, src.Superuser, ""))
	require.NoError(t, err)
	defer srcConn.Close(ctx)
	require.Eventually(t, func() bool {
		var ins int
		err := srcConn.QueryRow(ctx, `SELECT n_tup_ins FROM pg_stat_all_tables WHERE relid = 'public.t'::regclass`).Scan(&ins)
		return err == nil && ins == 101
	}, 15*time.Second, 50*time.Millisecond)
	// Quiet on success (cron mails whatever a job prints); -v tells.
	code, stdout, stderr = cli("refresh", "public.t")
	require.Equal(t, 0, code, stderr)
	require.Empty(t, stdout)
	require.Empty(t, stderr)
	var n int
	require.NoError(t, conn.QueryRow(ctx, `SELECT count(*) FROM public.t`).Scan(&n))
	require.Equal(t, 101, n)
	code, stdout, stderr = cli("refresh", "-v", "public.t")
	require.Equal(t, 0, code, stderr)
	require.Contains(t, stdout, "public.t: done (0 rows")
	require.Contains(t, stderr, "run finished")

	code, _, stderr = cli("refresh", "public.nope")
	require.Equal(t, 1, code)
	require.Contains(t, stderr, "not configured")

	require.NoError(t, src.Exec(ctx, srcDB, `DROP TABLE public.t`))
	code, _, stderr = cli("refresh", "public.t")
	require.Equal(t, 1, code)
	require.Contains(t, stderr, "source table does not exist")
	require.Equal(t, 1, strings.Count(stderr, "\n"), "one line for cron: %s", stderr)

	code, stdout, stderr = cli("status")
	require.Equal(t, 4, code, "a failing table and no agent alive: %s", stderr)
	require.Contains(t, stdout, "public.t")
	require.Contains(t, stdout, "failed: ")
	require.Contains(t, stderr, "warning: public.t is failing: ")
	require.Contains(t, stderr, "warning: no mimeo-agent is alive")
	code, stdout, _ = cli("status", "--json")
	require.Equal(t, 4, code)
	var rep struct {
		Healthy     bool `json:"healthy"`
		AgentsAlive int  `json:"agents_alive"`
		Tables      []struct {
			DestTable string `json:"dest_table"`
			Health    string `json:"health"`
			Why       string `json:"why"`
		} `json:"tables"`
	}
	require.NoError(t, json.Unmarshal([]byte(stdout), &rep), stdout)
	require.False(t, rep.Healthy)
	require.Zero(t, rep.AgentsAlive)
	require.Len(t, rep.Tables, 1)
	require.Equal(t, "failing", rep.Tables[0].Health)
	require.Contains(t, rep.Tables[0].Why, "source table does not exist")

	code, stdout, _ = cli("version")
	require.Equal(t, 0, code)
	require.Contains(t, stdout, "destination: mimeo schema "+agent.Version)

	for _, c := range []string{"install", "run", "refresh", "status", "version"} {
		code, _, stderr = cli(c, "--help")
		require.Equal(t, 0, code, c)
		require.Contains(t, stderr, "Usage: mimeo-agent "+c)
	}
	code, _, _ = cli("bogus")
	require.Equal(t, 2, code)
}

type mapLookuper map[string]string

func (m mapLookuper) Lookup(key string) (string, bool) {
	v, ok := m[key]
	return v, ok
}
