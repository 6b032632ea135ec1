package sql_test

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

// release is a schema an earlier binary installed (testdata/releases).
type release struct {
	commit, version string
	scripts         fstest.MapFS
}

// releases reads testdata/releases/releases.txt.
func releases(t *testing.T) []release {
	t.Helper()
	dir := filepath.Join("testdata", "releases")
	f, err := os.Open(filepath.Join(dir, "releases.txt"))
	require.NoError(t, err)
	defer f.Close()
	var out []release
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		require.GreaterOrEqual(t, len(fields), 3, "releases.txt: %q", sc.Text())
		r := release{commit: fields[0], version: fields[1], scripts: fstest.MapFS{}}
		for _, s := range fields[2:] {
			name, file, ok := strings.Cut(s, "=")
			require.True(t, ok, "releases.txt: %q", s)
			path := filepath.Join(dir, file)
			if file == "sql" {
				path = name // still shipped, unchanged, in this folder
			}
			data, err := os.ReadFile(path)
			require.NoError(t, err)
			r.scripts[name] = &fstest.MapFile{Data: data}
		}
		out = append(out, r)
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, out)
	return out
}

// schemaDump is pg_dump's view of the mimeo schema: what must be the same
// however a destination got to this version.
func schemaDump(t *testing.T, db string) string {
	t.Helper()
	dst := pgtest.Destination()
	cmd := exec.Command(filepath.Join(binDir(t), "pg_dump"), "--schema-only", "--schema=mimeo",
		"--dbname="+dst.ConnString(db, dst.Superuser, ""))
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		t.Fatalf("pg_dump %s: %v: %s", db, err, ee.Stderr)
	}
	require.NoError(t, err)
	// \restrict carries a random key per dump: the rest must match.
	var kept []string
	for _, line := range strings.Split(string(out), "\n") {
		if !strings.HasPrefix(line, `\restrict `) && !strings.HasPrefix(line, `\unrestrict `) {
			kept = append(kept, line)
		}
	}
	return strings.Join(kept, "\n")
}

// requireSameSchema fails with the lines only one of the dumps has.
func requireSameSchema(t *testing.T, want, got string) {
	t.Helper()
	if want == got {
		return
	}
	count := map[string]int{}
	for _, l := range strings.Split(want, "\n") {
		count[l]++
	}
	for _, l := range strings.Split(got, "\n") {
		count[l]--
	}
	var diff []string
	for l, n := range count {
		switch {
		case n > 0:
			diff = append(diff, "only fresh:    "+l)
		case n < 0:
			diff = append(diff, "only upgraded: "+l)
		}
	}
	slices.Sort(diff)
	if len(diff) > 60 {
		diff = append(diff[:60], "...")
	}
	if len(diff) == 0 {
		diff = []string{"(the same lines, in another order)"}
	}
	t.Fatalf("upgraded schema differs from a fresh install:\n%s", strings.Join(diff, "\n"))
}

// Every earlier release, installed by its own scripts and upgraded by this
// binary, has exactly the schema of a fresh install; so does a destination
// that went through each release's binary in turn.
func TestUpgradeFromEveryReleaseEqualsFreshInstall(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fresh := pgtest.Destination().NewDatabase(t, "", owner)
	_, err := mimeosql.Install(ctx, connect(t, fresh))
	require.NoError(t, err)
	want := schemaDump(t, fresh)
	require.Contains(t, want, "CREATE FUNCTION mimeo.installed_version()")

	all := releases(t)
	histories := make([][]release, 0, len(all)+1)
	for _, r := range all {
		histories = append(histories, []release{r})
	}
	histories = append(histories, all) // upgraded by every binary in turn
	for _, history := range histories {
		names := make([]string, len(history))
		for i, r := range history {
			names[i] = r.commit
		}
		t.Run(strings.Join(names, "-then-"), func(t *testing.T) {
			t.Parallel()
			db := pgtest.Destination().NewDatabase(t, "", owner)
			conn := connect(t, db)
			for _, r := range history {
				res, err := mimeosql.Installer{Scripts: r.scripts, Target: r.version}.Run(ctx, conn)
				require.NoError(t, err, "install as %s did", r.commit)
				require.Equal(t, r.version, res.To)
			}
			res, err := mimeosql.Install(ctx, conn)
			require.NoError(t, err)
			require.Equal(t, mimeosql.Version, res.To)
			requireSameSchema(t, want, schemaDump(t, db))
		})
	}
}

// Grants a DBA gave on mimeo's routines survive the upgrade that
// re-creates them, and the schema works for the role they were given to.
func TestUpgradeKeepsGrantsOnRoutines(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	require.NoError(t, pgtest.CreateRole(ctx, pgtest.Destination(), "mimeo_upgrade_ops", "", "LOGIN"))
	db := pgtest.Destination().NewDatabase(t, "", owner)
	conn := connect(t, db)
	all := releases(t)
	_, err := mimeosql.Installer{Scripts: all[len(all)-1].scripts, Target: "0.3.0"}.Run(ctx, conn)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, `
GRANT USAGE ON SCHEMA mimeo TO mimeo_upgrade_ops;
GRANT EXECUTE ON FUNCTION mimeo.refresh_snap(text, boolean, boolean), mimeo.wait(bigint, interval) TO mimeo_upgrade_ops;
GRANT EXECUTE ON PROCEDURE mimeo.refresh_snap_wait(text, boolean, boolean, interval), mimeo.commit_and_wait(bigint, interval) TO mimeo_upgrade_ops`)
	require.NoError(t, err)
	_, err = mimeosql.Install(ctx, conn)
	require.NoError(t, err)

	granted := func(routine string) bool {
		var ok bool
		require.NoError(t, conn.QueryRow(ctx, `SELECT has_function_privilege('mimeo_upgrade_ops', $1, 'EXECUTE')`, routine).Scan(&ok))
		return ok
	}
	require.True(t, granted("mimeo.refresh_snap(text, boolean, boolean, boolean, boolean)"), "p_force came in 0.6.0")
	require.True(t, granted("mimeo.wait(bigint, interval)"))
	require.True(t, granted("mimeo.refresh_snap_wait(text, boolean, boolean, boolean, interval, boolean)"))
	require.True(t, granted("mimeo.commit_and_wait(bigint, interval)"))
	require.True(t, granted("mimeo.wait_poll(bigint, timestamptz, interval)"), "the CALL forms poll with it")
	require.True(t, granted("mimeo.notice_steps(bigint, integer)"), "the CALL forms show steps with it")
	require.False(t, granted("mimeo.snapshot_maker(text, integer, text, boolean, boolean, text[], text, text[], boolean, boolean)"))
	require.False(t, granted("mimeo.refresh_dml(text, integer, boolean, boolean, boolean, boolean)"))

	// The role can use what it was given, and nothing else.
	ops, err := pgx.Connect(ctx, pgtest.Destination().ConnString(db, "mimeo_upgrade_ops", ""))
	require.NoError(t, err)
	defer ops.Close(ctx)
	_, err = ops.Exec(ctx, `SELECT mimeo.refresh_snap('public.nothing')`)
	require.ErrorContains(t, err, "public.nothing is not a replicated table")
	_, err = ops.Exec(ctx, `SELECT mimeo.refresh_dml('public.nothing')`)
	require.ErrorContains(t, err, "permission denied")
}
