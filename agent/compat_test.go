package agent_test

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

// Scripts written for mimeo 1.5 pass p_jobmon (to every maker and refresh)
// and p_insert_on_fetch (to refresh_dml/logdel): they run unchanged, and a
// NOTICE says what became of the option.
func TestMimeo15OptionsAreAcceptedAndIgnored(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	e.exec(e.app, `CREATE TABLE public.d (id int PRIMARY KEY, v int)`)
	e.prepareTriggers("public.d")
	e.startAgent(e.config())
	var notices []string
	cfg, err := pgx.ParseConfig(pgtest.Destination().ConnString(e.dstDB, agentRole, ""))
	require.NoError(t, err)
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n.Message) }
	conn, err := pgx.ConnectConfig(e.ctx, cfg)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	run := func(sql string, args ...any) {
		t.Helper()
		notices = nil
		var id int64
		require.NoError(t, conn.QueryRow(e.ctx, sql, args...).Scan(&id), sql)
		require.Equal(t, "done", e.await(id).Status, sql)
	}
	run(`SELECT mimeo.snapshot_maker('public.items', $1, p_jobmon => true)`, e.dblink)
	require.Equal(t, []string{"mimeo: p_jobmon is ignored: every run is logged in mimeo.job_log and mimeo.job_detail"}, notices)
	run(`SELECT mimeo.refresh_snap('public.items', p_jobmon => false)`)
	require.Len(t, notices, 1)
	run(`SELECT mimeo.dml_maker('public.d', $1, p_jobmon => false)`, e.dblink)
	require.Len(t, notices, 1)
	run(`SELECT mimeo.refresh_dml('public.d', p_jobmon => false, p_insert_on_fetch => false)`)
	require.Len(t, notices, 2)
	require.Contains(t, notices[1], "p_insert_on_fetch is ignored")
	run(`SELECT mimeo.refresh_dml('public.d')`)
	require.Empty(t, notices, "no option, no notice")
}

// A run that fails after some of its batches committed records the rows
// those batches moved (they stay on the destination).
func TestFailedRunRecordsTheRowsItCommitted(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.exec(e.app, `CREATE TABLE public.ins (id bigint PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.ins SELECT g, g FROM generate_series(1, 30) g`)
	e.exec(e.app, `GRANT SELECT ON public.ins TO `+replRole)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.inserter_maker('public.ins', 'id', $1, p_boundary => '0', p_pulldata => false)`, e.dblink)
	e.exec(e.dst, `UPDATE mimeo.refresh_config_inserter SET last_value = NULL, batch_limit = 10`)
	e.exec(e.dst, `ALTER TABLE public.ins ADD CONSTRAINT no_fifteen CHECK (id <> 15)`)
	o := e.await(e.request(`SELECT mimeo.refresh_inserter('public.ins')`))
	require.Equal(t, "failed", o.Status)
	require.Contains(t, *o.Error, "no_fifteen")
	require.EqualValues(t, 10, *o.Rows, "the first batch committed")
	require.Equal(t, 10, e.count("public.ins"))
	var logged int64
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT rows_moved FROM mimeo.job_log WHERE job_id = $1`, *o.JobID).Scan(&logged))
	require.EqualValues(t, 10, logged)
}

// A destination restored from a dump into a new database keeps working:
// an agent serves it, and its tables go on replicating.
func TestDestinationRestoredFromADump(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 50)
	e.exec(e.app, `CREATE TABLE public.d (id int PRIMARY KEY, v int)`)
	e.exec(e.app, `INSERT INTO public.d SELECT g, g FROM generate_series(1, 20) g`)
	e.prepareTriggers("public.d")
	stop := e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	e.done(`SELECT mimeo.dml_maker('public.d', $1)`, e.dblink)
	stop()

	dst := pgtest.Destination()
	bin, err := pgtest.FindBinDir()
	require.NoError(t, err)
	dump := filepath.Join(t.TempDir(), "destination.dump")
	out, err := exec.Command(filepath.Join(bin, "pg_dump"), "--format=custom", "--file="+dump,
		"--dbname="+dst.ConnString(e.dstDB, dst.Superuser, "")).CombinedOutput()
	require.NoError(t, err, string(out))
	restored := dst.NewDatabase(t, "template0", agentRole)
	out, err = exec.Command(filepath.Join(bin, "pg_restore"), "--exit-on-error",
		"--dbname="+dst.ConnString(restored, dst.Superuser, ""), dump).CombinedOutput()
	require.NoError(t, err, string(out))

	e.dstDB = restored
	e.dst = e.pool(dst.ConnString(restored, agentRole, ""))
	e.startAgent(e.config())
	e.writeAndWaitStats("public.items", `UPDATE items SET n = -1 WHERE id <= 5`)
	e.exec(e.app, `UPDATE d SET v = -v WHERE id <= 3`)
	e.exec(e.app, `TRUNCATE d`)
	e.exec(e.app, `INSERT INTO d VALUES (1, 1)`)
	e.done(`SELECT mimeo.refresh_snap('public.items')`)
	e.done(`SELECT mimeo.refresh_dml('public.d')`)
	e.requireSame("public.items", "public.items")
	e.requireSame("public.d", "public.d")
	var version string
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT mimeo.installed_version()`).Scan(&version))
	require.False(t, strings.HasPrefix(version, "0.3"), version)
}
