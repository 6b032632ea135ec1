package sql_test

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

const owner = "mimeo_owner"

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, func(_, dst *pgtest.Cluster) error {
		return pgtest.CreateRole(context.Background(), dst, owner, "", "LOGIN")
	}))
}

func connect(t *testing.T, db string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), pgtest.Destination().ConnString(db, owner, ""))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// A non-superuser owning the database installs mimeo; a second install,
// or two at once, is harmless.
func TestInstallIsIdempotent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.Destination().NewDatabase(t, "", owner)

	var wg sync.WaitGroup
	results := make([]mimeosql.Result, 2)
	errs := make([]error, 2)
	for i := range 2 {
		wg.Go(func() {
			conn, err := pgx.Connect(ctx, pgtest.Destination().ConnString(db, owner, ""))
			if err != nil {
				errs[i] = err
				return
			}
			defer conn.Close(ctx)
			results[i], errs[i] = mimeosql.Install(ctx, conn)
		})
	}
	wg.Wait()
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	require.Equal(t, mimeosql.Version, results[0].To)
	require.Equal(t, mimeosql.Version, results[1].To)
	require.Contains(t, []string{results[0].From, results[1].From}, "", "one install created the schema")

	conn := connect(t, db)
	res, err := mimeosql.Install(ctx, conn)
	require.NoError(t, err)
	require.Equal(t, mimeosql.Result{From: mimeosql.Version, To: mimeosql.Version}, res)

	var versions, distinct int
	require.NoError(t, conn.QueryRow(ctx, `SELECT count(*), count(DISTINCT version) FROM mimeo.schema_version`).Scan(&versions, &distinct))
	require.Equal(t, distinct, versions, "each script applied once")

	// dblink_mapping holds passwords: nobody but its owner reads it.
	var publicRead bool
	require.NoError(t, conn.QueryRow(ctx, `SELECT has_table_privilege('public', 'mimeo.dblink_mapping', 'SELECT')`).Scan(&publicRead))
	require.False(t, publicRead)
}

func TestInstallRefusesAForeignSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.Destination().NewDatabase(t, "", owner)
	conn := connect(t, db)
	_, err := conn.Exec(ctx, `CREATE SCHEMA mimeo; CREATE TABLE mimeo.refresh_config (x int)`)
	require.NoError(t, err)
	_, err = mimeosql.Install(ctx, conn)
	require.ErrorIs(t, err, mimeosql.ErrForeignSchema)
}

// The same files install with CREATE EXTENSION, by a non-superuser.
func TestInstallsAsExtension(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	out, err := exec.Command(filepath.Join(binDir(t), "pg_config"), "--sharedir").Output()
	require.NoError(t, err)
	extDir := filepath.Join(strings.TrimSpace(string(out)), "extension")
	copyExtensionFiles(t, extDir)

	db := pgtest.Destination().NewDatabase(t, "", owner)
	conn := connect(t, db)
	_, err = conn.Exec(ctx, `CREATE EXTENSION mimeo`)
	require.NoError(t, err)
	var name string
	require.NoError(t, conn.QueryRow(ctx, `SELECT mimeo.qualified_name('Public."Odd Name"')`).Scan(&name))
	require.Equal(t, `public."Odd Name"`, name)

	res, err := mimeosql.Install(ctx, conn)
	require.NoError(t, err)
	require.True(t, res.Extension)

	// A destination made with an earlier version of the extension updates
	// to this one.
	old := pgtest.Destination().NewDatabase(t, "", owner)
	oldConn := connect(t, old)
	_, err = oldConn.Exec(ctx, `CREATE EXTENSION mimeo VERSION '0.3.0'`)
	require.NoError(t, err)
	_, err = mimeosql.Install(ctx, oldConn)
	require.ErrorContains(t, err, "ALTER EXTENSION mimeo UPDATE")
	_, err = oldConn.Exec(ctx, `ALTER EXTENSION mimeo UPDATE`)
	require.NoError(t, err)
	var version string
	require.NoError(t, oldConn.QueryRow(ctx, `SELECT mimeo.installed_version()`).Scan(&version))
	require.Equal(t, mimeosql.Version, version)
	res, err = mimeosql.Install(ctx, oldConn)
	require.NoError(t, err)
	require.True(t, res.Extension)
}

func binDir(t *testing.T) string {
	dir, err := pgtest.FindBinDir()
	require.NoError(t, err)
	return dir
}

// copyExtensionFiles puts the embedded files into PostgreSQL's extension
// folder, as a DBA would, and removes what it added afterwards.
func copyExtensionFiles(t *testing.T, extDir string) {
	t.Helper()
	files := mimeosql.Files()
	entries, err := fs.ReadDir(files, ".")
	require.NoError(t, err)
	for _, e := range entries {
		data, err := fs.ReadFile(files, e.Name())
		require.NoError(t, err)
		dst := filepath.Join(extDir, e.Name())
		if old, err := os.ReadFile(dst); err == nil && bytes.Equal(old, data) {
			continue // already installed by hand: leave it
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			t.Skipf("cannot write PostgreSQL's extension folder %s (run as root to test CREATE EXTENSION): %v", extDir, err)
		}
		t.Cleanup(func() { _ = os.Remove(dst) })
	}
}
