package pgtest

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Connect opens a new connection to db as the superuser over the Unix socket.
// The caller must close it.
func (c *Cluster) Connect(ctx context.Context, db string) (*pgx.Conn, error) {
	conn, err := pgx.Connect(ctx, c.ConnString(db, c.Superuser, ""))
	if err != nil {
		return nil, fmt.Errorf("pgtest: connect to %s on %s: %w", db, c.Name, err)
	}
	return conn, nil
}

// Exec runs sql in db as the superuser on a connection of its own, closed
// before Exec returns. Without args, sql may hold several statements.
func (c *Cluster) Exec(ctx context.Context, db, sql string, args ...any) error {
	conn, err := c.Connect(ctx, db)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		return fmt.Errorf("pgtest: exec in %s on %s: %w", db, c.Name, err)
	}
	return nil
}

// CreateDatabase creates database name, copied from template and owned by
// owner; either may be "" for the server's default.
//
// PostgreSQL refuses to copy a template while any other session is connected
// to it (SQLSTATE 55006). The harness itself only ever connects to the
// "postgres" database to do this, but a test may briefly hold a connection to
// a template it is preparing, so that error is retried a few times.
func (c *Cluster) CreateDatabase(ctx context.Context, name, template, owner string) error {
	sql := "CREATE DATABASE " + pgx.Identifier{name}.Sanitize()
	if template != "" {
		sql += " TEMPLATE " + pgx.Identifier{template}.Sanitize()
	}
	if owner != "" {
		sql += " OWNER " + pgx.Identifier{owner}.Sanitize()
	}
	backoff := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := c.Exec(ctx, "postgres", sql)
		if err == nil || attempt == 6 || !hasCode(err, "55006") {
			return err
		}
		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

// DropDatabase drops database name if it exists, disconnecting its sessions.
func (c *Cluster) DropDatabase(ctx context.Context, name string) error {
	return c.Exec(ctx, "postgres", "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)")
}

// dbCounter makes database names unique within the test binary.
var dbCounter atomic.Int64

var nonIdent = regexp.MustCompile(`[^a-z0-9]+`)

// maxIdentLen is PostgreSQL's identifier limit (NAMEDATALEN-1) in bytes.
const maxIdentLen = 63

// NewDatabase creates a database for the test t, named after it, copied from
// template and owned by owner ("" for defaults), and returns its name. The
// database is dropped when the test ends, unless the test failed: then it is
// kept for inspection. NewDatabase is safe for parallel tests; it fails the
// test when the database cannot be created.
func (c *Cluster) NewDatabase(t testing.TB, template, owner string) string {
	t.Helper()
	name := databaseName(t.Name(), dbCounter.Add(1))
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := c.CreateDatabase(ctx, name, template, owner); err != nil {
		t.Fatalf("pgtest: create database for %s: %v", t.Name(), err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("keeping database %s on %s for inspection", name, c.ConnString(name, c.Superuser, ""))
			return
		}
		// t.Context is already cancelled when cleanups run.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.DropDatabase(ctx, name); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	return name
}

// databaseName builds "t_<test name>_<n>": lowercase ASCII so it needs no
// quoting in psql, and cut so the whole stays within 63 bytes, past which
// PostgreSQL would silently truncate it.
func databaseName(testName string, n int64) string {
	suffix := "_" + strconv.FormatInt(n, 10)
	base := strings.Trim(nonIdent.ReplaceAllString(strings.ToLower(testName), "_"), "_")
	if room := maxIdentLen - len("t_") - len(suffix); len(base) > room {
		base = strings.TrimRight(base[:room], "_")
	}
	return "t_" + base + suffix
}

// CreateRole creates role name on c unless it exists, with attrs as role
// options (e.g. "LOGIN" or "LOGIN REPLICATION"; applied with ALTER ROLE when
// the role already exists), and sets its password when password is non-empty.
func CreateRole(ctx context.Context, c *Cluster, name, password, attrs string) error {
	if strings.ContainsRune(password, 0) {
		return errors.New("pgtest: a role password cannot contain a NUL byte")
	}
	conn, err := c.Connect(ctx, "postgres")
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	ident := pgx.Identifier{name}.Sanitize()
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", name).Scan(&exists); err != nil {
		return fmt.Errorf("pgtest: look up role %s: %w", name, err)
	}
	var stmts []string
	if !exists {
		stmts = append(stmts, strings.TrimSpace("CREATE ROLE "+ident+" "+withAttrs(attrs)))
	} else if attrs != "" {
		stmts = append(stmts, "ALTER ROLE "+ident+" "+withAttrs(attrs))
	}
	if password != "" {
		// Utility statements such as ALTER ROLE take no bind parameters, so
		// the password goes in as a literal. With standard_conforming_strings
		// on (forced below) doubling single quotes is all the escaping needed.
		stmts = append(stmts, "SET standard_conforming_strings = on",
			"ALTER ROLE "+ident+" PASSWORD '"+strings.ReplaceAll(password, "'", "''")+"'")
	}
	for _, sql := range stmts {
		_, err := conn.Exec(ctx, sql)
		if hasCode(err, "42710") && strings.HasPrefix(sql, "CREATE ROLE") {
			// Created concurrently by someone else since the lookup.
			if attrs == "" {
				continue
			}
			_, err = conn.Exec(ctx, "ALTER ROLE "+ident+" "+withAttrs(attrs))
		}
		if err != nil {
			return fmt.Errorf("pgtest: create role %s: %w", name, err)
		}
	}
	return nil
}

func withAttrs(attrs string) string {
	if attrs == "" {
		return ""
	}
	return "WITH " + attrs
}

// hasCode reports whether err carries a PostgreSQL error with SQLSTATE code.
func hasCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}
