package pgtest_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/pgtest"
)

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m, nil))
}

func TestClustersAnswer(t *testing.T) {
	t.Parallel()
	for _, c := range []*pgtest.Cluster{pgtest.Source(), pgtest.Destination()} {
		conn, err := c.Connect(t.Context(), "postgres")
		require.NoError(t, err, c.Name)
		var one int
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT 1").Scan(&one))
		require.Equal(t, 1, one)
		require.NoError(t, conn.Close(t.Context()))
	}
	require.NotEqual(t, pgtest.Source().Port, pgtest.Destination().Port)
}

func TestWalLevel(t *testing.T) {
	t.Parallel()
	require.Equal(t, "logical", show(t, pgtest.Source(), "wal_level"))
	require.Equal(t, "replica", show(t, pgtest.Destination(), "wal_level"))
	require.Equal(t, "off", show(t, pgtest.Destination(), "fsync"))
	require.Equal(t, "UTF8", show(t, pgtest.Source(), "server_encoding"))
}

func show(t *testing.T, c *pgtest.Cluster, setting string) string {
	t.Helper()
	conn, err := c.Connect(t.Context(), "postgres")
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var v string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT current_setting($1)", setting).Scan(&v))
	return v
}

func TestNewDatabase(t *testing.T) {
	t.Parallel()
	c := pgtest.Source()
	db := c.NewDatabase(t, "", "")
	require.LessOrEqual(t, len(db), 63)
	require.True(t, strings.HasPrefix(db, "t_testnewdatabase_"), db)

	require.NoError(t, c.Exec(t.Context(), db, "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1), (2)"))
	conn, err := c.Connect(t.Context(), db)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var current string
	var n int
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT current_database(), (SELECT count(*) FROM items)").Scan(&current, &n))
	require.Equal(t, db, current)
	require.Equal(t, 2, n)
}

// TestNewDatabaseFromTemplate copies one template into many databases at once,
// which PostgreSQL only allows while nobody is connected to the template.
func TestNewDatabaseFromTemplate(t *testing.T) {
	t.Parallel()
	c := pgtest.Destination()
	tmpl := c.NewDatabase(t, "", "")
	require.NoError(t, c.Exec(t.Context(), tmpl, "CREATE TABLE seeded (v text); INSERT INTO seeded VALUES ('x')"))
	require.NoError(t, pgtest.CreateRole(t.Context(), c, "template_owner", "", "NOLOGIN"))

	for i := range 8 {
		t.Run(fmt.Sprintf("copy %d with a rather long name that must be truncated to fit", i), func(t *testing.T) {
			t.Parallel()
			db := c.NewDatabase(t, tmpl, "template_owner")
			require.LessOrEqual(t, len(db), 63)
			conn, err := c.Connect(t.Context(), db)
			require.NoError(t, err)
			defer conn.Close(context.Background())
			var v, owner string
			require.NoError(t, conn.QueryRow(t.Context(),
				"SELECT (SELECT v FROM seeded), pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()").Scan(&v, &owner))
			require.Equal(t, "x", v)
			require.Equal(t, "template_owner", owner)
		})
	}
}

func TestPasswordRole(t *testing.T) {
	t.Parallel()
	c := pgtest.Destination()
	db := c.NewDatabase(t, "", "")
	const role, password = "app user", `it's a \secret`
	require.NoError(t, pgtest.CreateRole(t.Context(), c, role, "first", "LOGIN"))
	// A second call finds the role and just updates it.
	require.NoError(t, pgtest.CreateRole(t.Context(), c, role, password, "LOGIN"))

	conn, err := pgx.Connect(t.Context(), c.TCPConnString(db, role, password))
	require.NoError(t, err)
	var user string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT current_user").Scan(&user))
	require.Equal(t, role, user)
	require.NoError(t, conn.Close(t.Context()))

	for _, wrong := range []string{"first", "wrong"} {
		_, err = pgx.Connect(t.Context(), fmt.Sprintf("host=127.0.0.1 port=%d dbname=%s user='app user' password=%s sslmode=disable", c.Port, db, wrong))
		var pgErr *pgconn.PgError
		require.True(t, errors.As(err, &pgErr), "want a server error, got %v", err)
		require.Equal(t, "28P01", pgErr.Code)
	}
}

func TestConnStringQuoting(t *testing.T) {
	t.Parallel()
	c := &pgtest.Cluster{SocketDir: "/tmp/a b", Port: 5433}
	require.Equal(t, `host='/tmp/a b' port=5433 dbname=db user=u`, c.ConnString("db", "u", ""))
	require.Equal(t, `host='/tmp/a b' port=5433 dbname='' user=u password='it\'s \\ x'`, c.ConnString("", "u", `it's \ x`))

	cfg, err := pgx.ParseConfig(c.ConnString("my db", "o'brien", `p w'\`))
	require.NoError(t, err)
	require.Equal(t, "/tmp/a b", cfg.Host)
	require.Equal(t, "my db", cfg.Database)
	require.Equal(t, "o'brien", cfg.User)
	require.Equal(t, `p w'\`, cfg.Password)
}

func TestFindBinDir(t *testing.T) {
	dir, err := pgtest.FindBinDir()
	require.NoError(t, err)
	require.FileExists(t, dir+"/initdb")

	t.Setenv("MIMEO_PG_BINDIR", t.TempDir())
	_, err = pgtest.FindBinDir()
	require.ErrorContains(t, err, "apt-get install -y postgresql")
}
