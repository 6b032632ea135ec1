package agent_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

// A slot the source invalidated (its WAL passed max_slot_wal_keep_size
// while the agent was stopped) is reported as needing a resync, never
// replaced and continued; one repull repairs the table. The source is a
// cluster of its own: the setting would invalidate other tests' slots.
func TestLogicalInvalidatedSlotIsReported(t *testing.T) {
	t.Parallel()
	c, err := pgtest.StartCluster(pgtest.Options{Name: "lostslot", Settings: map[string]string{
		"wal_level": "logical", "max_replication_slots": "4", "max_wal_senders": "4", "max_slot_wal_keep_size": "1MB",
	}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Stop() })
	e := setupLogical(t)
	require.NoError(t, pgtest.CreateRole(e.ctx, c, appRole, "", "LOGIN"))
	require.NoError(t, pgtest.CreateRole(e.ctx, c, logicalRole, logicalPass, "LOGIN REPLICATION"))
	require.NoError(t, c.Exec(e.ctx, "postgres", "GRANT "+appRole+" TO "+logicalRole))
	require.NoError(t, c.CreateDatabase(e.ctx, e.srcDB, "", appRole))
	e.src = e.pool(c.ConnString(e.srcDB, c.Superuser, ""))
	e.app = e.pool(c.ConnString(e.srcDB, appRole, ""))
	e.exec(e.dst, `UPDATE mimeo.dblink_mapping SET data_source = $1 WHERE data_source_id = $2`, e.sourceInfo(c.Port), e.dblink)

	slot := e.streamedThenStopped()
	// A change the slot will not keep, then WAL past its limit.
	e.exec(e.app, `INSERT INTO public.t VALUES (101, 'lost to the slot')`)
	e.exec(e.src, `CREATE TABLE public.pad (v text)`)
	for range 3 {
		e.exec(e.src, `INSERT INTO public.pad SELECT repeat(md5(g::text), 40) FROM generate_series(1, 2000) g`)
		e.exec(e.src, `SELECT pg_switch_wal()`)
	}
	e.exec(e.src, `CHECKPOINT`)
	var walStatus string
	require.NoError(t, e.src.QueryRow(e.ctx, `SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&walStatus))
	require.Equal(t, "lost", walStatus, "the source did not invalidate the slot; the test's premise failed")

	e.resyncReported("invalidated")
	e.repullRepairs()
}
