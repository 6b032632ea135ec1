package agent_test

import (
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

// superuser returns a superuser pool on the destination database, for what
// a DBA does there and the agent's role may not.
func (e *env) superuser() *pgxpool.Pool {
	dst := pgtest.Destination()
	return e.pool(dst.ConnString(e.dstDB, dst.Superuser, ""))
}

// access describes who owns rel and who holds which privileges on it.
func (e *env) access(rel string) string {
	e.t.Helper()
	var s string
	require.NoError(e.t, e.dst.QueryRow(e.ctx, `
SELECT format('owner %s; %s', pg_get_userbyid(c.relowner), (
    SELECT string_agg(p, ', ' ORDER BY p) FROM (
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END
               || ' ' || a.privilege_type || CASE WHEN a.is_grantable THEN ' with grant option' ELSE '' END AS p
        FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a) x))
FROM pg_class c WHERE c.oid = $1::regclass`, rel).Scan(&s))
	return s
}

// accessAll describes the access of the view public.items and its tables.
func (e *env) accessAll() []string {
	e.t.Helper()
	return []string{e.access("public.items"), e.access("public.items_snap1"), e.access("public.items_snap2")}
}

// handItemsTo does what a DBA does: gives the view public.items and its
// snap tables to owner, grants SELECT on the view to reader and on the
// tables to operator, and lets owner own tables in schema public.
func (e *env) handItemsTo(su *pgxpool.Pool, owner string) {
	e.t.Helper()
	o := pgx.Identifier{owner}.Sanitize()
	for _, q := range []string{
		`ALTER VIEW public.items OWNER TO ` + o,
		`ALTER TABLE public.items_snap1 OWNER TO ` + o,
		`ALTER TABLE public.items_snap2 OWNER TO ` + o,
		`GRANT SELECT ON public.items TO reader`,
		`GRANT SELECT ON public.items_snap1, public.items_snap2 TO operator`,
		`GRANT CREATE ON SCHEMA public TO ` + o,
	} {
		e.exec(su, q)
	}
}

// requireReaderSees checks, as the role reader, that the view public.items
// holds exactly the source's rows.
func (e *env) requireReaderSees(su *pgxpool.Pool) {
	e.t.Helper()
	var got string
	require.NoError(e.t, pgx.BeginFunc(e.ctx, su, func(tx pgx.Tx) error {
		if _, err := tx.Exec(e.ctx, `SET LOCAL ROLE reader`); err != nil {
			return err
		}
		return tx.QueryRow(e.ctx, `SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM public.items x`).Scan(&got)
	}), "reader reads public.items")
	require.Equal(e.t, checksum(e.t, e.ctx, e.src, "public.items"), got, "reader reads the source's rows through the view")
}

// A DBA who hands the view and its tables to another role finds them still
// handed over, and readable, after refreshes reloaded both tables.
func TestSnapRefreshKeepsOwnerAndGrants(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 300)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	su := e.superuser()
	e.handItemsTo(su, keeperRole)
	before := e.accessAll()
	require.Contains(t, before[0], "owner Snap Keeper; ")
	require.Contains(t, before[0], "reader SELECT")
	require.Contains(t, before[1], "operator SELECT")
	e.requireReaderSees(su)

	for _, reloaded := range []string{"public.items_snap2", "public.items_snap1"} {
		e.writeAndWaitStats("public.items", `UPDATE items SET n = coalesce(n, 0) + 1 WHERE id % 10 = 0`)
		o := e.done(`SELECT mimeo.refresh_snap('public.items')`)
		require.NotContains(t, *o.Message, "skipped")
		require.Equal(t, reloaded, "public."+e.viewReads("public.items"))
		require.Equal(t, before, e.accessAll(), "owners and grants after reloading %s", reloaded)
		e.requireReaderSees(su)
	}
}

// A source column change drops and re-creates the view and both tables:
// they keep their owners and grants all the same.
func TestSnapRebuildKeepsOwnerAndGrants(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 300)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	su := e.superuser()
	e.handItemsTo(su, keeperRole)
	before := e.accessAll()

	e.exec(e.app, `ALTER TABLE items ADD COLUMN extra text DEFAULT 'new'`)
	o := e.done(`SELECT mimeo.refresh_snap('public.items')`)
	require.NotContains(t, *o.Message, "skipped")
	require.Contains(t, e.viewColumns("public.items"), "extra text")
	require.Equal(t, before, e.accessAll(), "owners and grants after the rebuild")
	e.requireReaderSees(su)

	// And the next plain refresh, into the table the rebuild re-created.
	e.writeAndWaitStats("public.items", `UPDATE items SET extra = 'changed' WHERE id % 10 = 0`)
	e.done(`SELECT mimeo.refresh_snap('public.items')`)
	require.Equal(t, before, e.accessAll(), "owners and grants after the refresh after the rebuild")
	e.requireReaderSees(su)
}

// Objects the agent cannot give back to their owner fail the refresh with
// what to grant, before anything is dropped.
func TestSnapRefreshNamesMissingGrant(t *testing.T) {
	t.Parallel()
	t.Run("owner the agent is not a member of", func(t *testing.T) {
		t.Parallel()
		e := setup(t)
		e.createItems("public.items", 50)
		e.startAgent(e.config())
		e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
		su := e.superuser()
		e.handItemsTo(su, strangerRole)
		before := e.accessAll()

		e.writeAndWaitStats("public.items", `UPDATE items SET n = 1 WHERE id = 1`)
		msg := e.failed(`SELECT mimeo.refresh_snap('public.items')`)
		require.Contains(t, msg, "is owned by stranger")
		require.Contains(t, msg, "GRANT stranger TO mimeo_agent")
		require.Equal(t, before, e.accessAll())
		require.Equal(t, "items_snap1", e.viewReads("public.items"))
	})
	t.Run("owner without CREATE on the schema", func(t *testing.T) {
		t.Parallel()
		e := setup(t)
		e.createItems("public.items", 50)
		e.startAgent(e.config())
		e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
		su := e.superuser()
		e.handItemsTo(su, keeperRole)
		e.exec(su, `REVOKE CREATE ON SCHEMA public FROM "Snap Keeper"`)
		before := e.accessAll()

		e.writeAndWaitStats("public.items", `UPDATE items SET n = 1 WHERE id = 1`)
		msg := e.failed(`SELECT mimeo.refresh_snap('public.items')`)
		require.Contains(t, msg, `GRANT CREATE ON SCHEMA public TO "Snap Keeper"`)
		require.Equal(t, before, e.accessAll())
		require.Equal(t, "items_snap1", e.viewReads("public.items"))
	})
}

// Archiving leaves a plain table in the view's place, with the view's owner
// and grants: it is what the view's readers and its owner used.
func TestSnapDestroyerArchiveKeepsOwner(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 100)
	e.startAgent(e.config())
	e.done(`SELECT mimeo.snapshot_maker('public.items', $1)`, e.dblink)
	su := e.superuser()
	// Only the view is handed over; the tables stay the agent's.
	for _, q := range []string{
		`ALTER VIEW public.items OWNER TO "Snap Keeper"`,
		`GRANT SELECT ON public.items_snap1, public.items_snap2 TO "Snap Keeper"`,
		`GRANT SELECT ON public.items TO reader`,
		`GRANT CREATE ON SCHEMA public TO "Snap Keeper"`,
	} {
		e.exec(su, q)
	}
	e.requireReaderSees(su)

	e.done(`SELECT mimeo.snapshot_destroyer('public.items', 'ARCHIVE')`)
	access := e.access("public.items")
	require.Contains(t, access, "owner Snap Keeper; ")
	require.Contains(t, access, "reader SELECT")
	e.requireReaderSees(su)
}

// post_script runs when snapshot_maker creates the tables too, in its
// transaction: a broken one fails the maker and leaves nothing behind.
func TestSnapMakerRunsPostScript(t *testing.T) {
	t.Parallel()
	e := setup(t)
	e.createItems("public.items", 50)
	e.startAgent(e.config())

	msg := e.failed(`SELECT mimeo.snapshot_maker('public.items', $1, p_post_script => $2)`, e.dblink,
		[]string{`GRANT SELECT ON public.items TO reader`, `SELECT no_such_function()`})
	require.Contains(t, msg, "post_script")
	require.Contains(t, msg, "SELECT no_such_function()")
	require.Contains(t, msg, "function no_such_function() does not exist")
	var left int
	require.NoError(t, e.dst.QueryRow(e.ctx, `
SELECT (SELECT count(*) FROM pg_class WHERE relname IN ('items', 'items_snap1', 'items_snap2'))
     + (SELECT count(*) FROM mimeo.refresh_config)`).Scan(&left))
	require.Zero(t, left, "a failed maker leaves no view, table or config")

	e.done(`SELECT mimeo.snapshot_maker('public.items', $1, p_post_script => $2)`, e.dblink,
		[]string{`GRANT SELECT ON public.items TO reader`})
	var canRead bool
	require.NoError(t, e.dst.QueryRow(e.ctx, `SELECT has_table_privilege('reader', 'public.items', 'SELECT')`).Scan(&canRead))
	require.True(t, canRead, "post_script ran in the maker")
	e.requireSame("public.items", "public.items")
}
