package agent_test

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

// sqlError runs a statement that must be refused at once, before anything
// is queued, and returns the error message.
func (e *env) sqlError(sql string, args ...any) string {
	e.t.Helper()
	_, err := e.dst.Exec(e.ctx, sql, args...)
	var pgErr *pgconn.PgError
	require.True(e.t, errors.As(err, &pgErr), "want a PostgreSQL error from %s, got %v", sql, err)
	return pgErr.Message
}

func TestBadInputRaisesAtOnce(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)

	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_maker('public.items', 999)`), "no source with data_source_id 999")
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_maker('items', $1)`, e.dblink), "must be schema-qualified")
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_maker('public."unterminated', $1)`, e.dblink), "not a valid name")
	require.Contains(t, e.sqlError(`SELECT mimeo.refresh_snap('public.nothing')`), "is not a replicated table")
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_destroyer('public.nothing')`), "is not a replicated table")
	require.Contains(t, e.sqlError(`SELECT mimeo.table_maker('public.x', NULL)`), "p_dblink_id is required")
	require.Contains(t, e.sqlError(`SELECT mimeo.run_refresh('bogus')`), "unknown replication type")
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_maker('public.items', $1, 'nowhere.items')`, e.dblink), "destination schema of nowhere.items does not exist")
	e.exec(e.dst, `CREATE TABLE public.taken (id int)`)
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_maker('public.items', $1, 'public.taken')`, e.dblink), "already exists")

	var queued int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.request`).Scan(&queued))
	require.Zero(t, queued, "refused calls queue nothing")
}

func TestBadInputFailsTheRequest(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	e.exec(e.app, `CREATE TABLE public.secret (id int)`)
	e.startAgent(e.config())

	require.Contains(t, e.failed(`SELECT mimeo.snapshot_maker('public.missing', $1)`, e.dblink),
		"public.missing: source table does not exist")
	require.Contains(t, e.failed(`SELECT mimeo.snapshot_maker('public.secret', $1)`, e.dblink),
		"lacks SELECT")
	require.Contains(t, e.failed(`SELECT mimeo.snapshot_maker('public.items', $1, p_filter => ARRAY['id', 'nope'])`, e.dblink),
		`filter names column "nope"`)
	require.Contains(t, e.failed(`SELECT mimeo.snapshot_maker('public.items', $1, p_condition => 'WHERE nope > 1')`, e.dblink),
		`column "nope" does not exist`)
	require.Contains(t, e.failed(`SELECT mimeo.snapshot_maker('public.items', $1, p_condition => 'true); DROP TABLE public.items; --')`, e.dblink),
		"condition")

	// A wrong password over TCP with libpq's default sslmode (prefer): pgx
	// first tries TLS, which the test server refuses, then plaintext. The
	// DBA reads the server's answer first, not the TLS refusal.
	var wrongPass, unreachable int
	require.NoError(t, e.dst.QueryRow(e.ctx, `INSERT INTO mimeo.dblink_mapping (data_source, username, pwd) VALUES ($1, $2, 'wrong-pw-4711') RETURNING data_source_id`,
		fmt.Sprintf("host=127.0.0.1 port=%d dbname=%s", pgtest.Source().Port, e.srcDB), replRole).Scan(&wrongPass))
	msg := e.failed(`SELECT mimeo.snapshot_maker('public.items', $1)`, wrongPass)
	prefix := fmt.Sprintf("connect to source %d (host=127.0.0.1 port=%d dbname=%s user=%s): ", wrongPass, pgtest.Source().Port, e.srcDB, replRole)
	_, reason, ok := strings.Cut(msg, prefix)
	require.True(t, ok, "names the source: %s", msg)
	require.True(t, strings.HasPrefix(reason, `FATAL: password authentication failed for user "`+replRole+`" (SQLSTATE 28P01)`), "starts with the server's answer: %s", msg)
	require.NotContains(t, msg, "TLS")
	require.NotContains(t, msg, "wrong-pw-4711")

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedPort := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())
	require.NoError(t, e.dst.QueryRow(e.ctx, `INSERT INTO mimeo.dblink_mapping (data_source, username, pwd) VALUES ($1, 'x', 'y') RETURNING data_source_id`,
		e.sourceInfo(closedPort)).Scan(&unreachable))
	msg = e.failed(`SELECT mimeo.snapshot_maker('public.items', $1)`, unreachable)
	require.Contains(t, msg, "connect to source")
	require.Contains(t, msg, "connection refused")

	// None of that left anything behind, and the source table is intact.
	var configs, tables int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT (SELECT count(*) FROM mimeo.refresh_config), (SELECT count(*) FROM pg_tables WHERE schemaname = 'public')`).Scan(&configs, &tables))
	require.Zero(t, configs)
	require.Zero(t, tables)
	var n int
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT count(*) FROM public.items`).Scan(&n))
	require.Equal(t, 10, n)

	// The job log says what went wrong, too.
	var critical int
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT count(*) FROM mimeo.job_log WHERE status = 'CRITICAL'`).Scan(&critical))
	require.Equal(t, 7, critical)
}

func TestWaitTimesOutNamingAgentState(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	id := e.request(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)

	require.Contains(t, e.sqlError(`SELECT mimeo.wait($1, '200 ms')`, id), "no mimeo-agent is running")
	require.Contains(t, e.sqlError(`SELECT mimeo.wait(123456)`), "no request with id 123456")

	tx, err := e.dst.Begin(e.ctx)
	require.NoError(t, err)
	defer tx.Rollback(e.ctx)
	var inTx int64
	require.NoError(t, tx.QueryRow(e.ctx, `SELECT mimeo.enqueue('refresh_snap', 'public.items')`).Scan(&inTx))
	_, err = tx.Exec(e.ctx, `SELECT mimeo.wait($1, '1 s')`, inTx)
	require.ErrorContains(t, err, "was made in this transaction")
}

// CALL ..._wait commits the request and blocks until the agent is done,
// like the synchronous functions of the original mimeo.
func TestCallWaitForm(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 100)
	e.startAgent(e.config())
	e.exec(e.dst, `CALL mimeo.snapshot_maker_wait('public.items', $1)`, e.dblink)
	e.requireSame("public.items", "public.items")
	_, err := e.dst.Exec(e.ctx, `CALL mimeo.snapshot_maker_wait('public.missing', $1)`, e.dblink)
	require.ErrorContains(t, err, "source table does not exist")
}

// An operator role granted one function can call it, and nothing else:
// neither the other functions nor the queue table behind them.
func TestOperatorRoleNeedsOnlyExecute(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 10)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	require.Contains(t, e.sqlError(`SELECT mimeo.snapshot_destroyer('public.items', 'KEEP')`), "p_archive_option must be")

	e.exec(e.dst, `GRANT USAGE ON SCHEMA mimeo TO operator`)
	// Exactly the grants the README gives.
	e.exec(e.dst, `GRANT EXECUTE ON FUNCTION mimeo.refresh_snap(text, boolean, boolean, boolean, boolean), mimeo.wait(bigint, interval),
    mimeo.wait_poll(bigint, timestamptz, interval) TO operator`)
	e.exec(e.dst, `GRANT EXECUTE ON PROCEDURE mimeo.refresh_snap_wait(text, boolean, boolean, boolean, interval, boolean),
    mimeo.commit_and_wait(bigint, interval) TO operator`)
	e.exec(e.dst, `GRANT EXECUTE ON FUNCTION mimeo.notice_steps(bigint, integer) TO operator`)
	e.exec(e.dst, `GRANT EXECUTE ON FUNCTION mimeo.validate(text, boolean, boolean), mimeo.report_validation(bigint) TO operator`)
	e.exec(e.dst, `GRANT EXECUTE ON PROCEDURE mimeo.validate_wait(text, boolean, boolean, interval),
    mimeo.commit_and_report(bigint, interval) TO operator`)
	e.exec(e.dst, `GRANT SELECT ON mimeo.validation, mimeo.refresh_status TO operator`)
	op := e.pool(pgtest.Destination().ConnString(e.dstDB, "operator", ""))
	var id int64
	require.NoError(t, op.QueryRow(e.ctx, `SELECT mimeo.refresh_snap('public.items')`).Scan(&id))
	var status, by string
	require.NoError(t, op.QueryRow(e.ctx, `SELECT status, requested_by FROM mimeo.wait($1, '30 s')`, id).Scan(&status, &by))
	require.Equal(t, "done", status)
	require.Equal(t, "operator", by, "the request says who asked")
	_, err := op.Exec(e.ctx, `CALL mimeo.refresh_snap_wait('public.items', p_timeout => '30 s')`)
	require.NoError(t, err, "the CALL form works with the same grants")
	_, err = op.Exec(e.ctx, `CALL mimeo.refresh_snap_wait('public.items', p_debug => true, p_force => true, p_timeout => '30 s')`)
	require.NoError(t, err, "and shows its steps")
	_, err = op.Exec(e.ctx, `CALL mimeo.validate_wait('public.items', p_repair => true, p_debug => true, p_timeout => '30 s')`)
	require.NoError(t, err, "validation too")
	var ok bool
	require.NoError(t, op.QueryRow(e.ctx, `SELECT ok FROM mimeo.validation WHERE dest_table = 'public.items'`).Scan(&ok))
	require.True(t, ok)
	var health string
	require.NoError(t, op.QueryRow(e.ctx, `SELECT health FROM mimeo.refresh_status WHERE dest_table = 'public.items'`).Scan(&health),
		"refresh_status needs no EXECUTE right")
	require.Equal(t, "ok", health)
	for _, q := range []string{
		`SELECT mimeo.snapshot_destroyer('public.items')`,
		`INSERT INTO mimeo.request (action, dest_table) VALUES ('snapshot_destroyer', 'public.items')`,
		`SELECT * FROM mimeo.dblink_mapping`,
	} {
		_, err := op.Exec(e.ctx, q)
		require.ErrorContains(t, err, "permission denied", q)
	}
}
