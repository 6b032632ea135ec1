package sql

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// ErrNewerSchema means the database holds a newer mimeo schema than this
// binary knows: upgrade the binary, not the schema.
var ErrNewerSchema = errors.New("mimeo schema is newer than this binary")

// ErrForeignSchema means a schema named mimeo exists with objects that
// mimeo-agent did not install (e.g. the PL/pgSQL mimeo extension).
var ErrForeignSchema = errors.New("schema mimeo exists but was not installed by mimeo-agent")

const (
	sqlExtensionVersion = `SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'mimeo'`
	sqlPrepare          = `
SELECT pg_advisory_xact_lock(1835625830);
CREATE SCHEMA IF NOT EXISTS mimeo;
CREATE TABLE IF NOT EXISTS mimeo.schema_version (
    version text PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);`
	sqlInstalledVersions = `SELECT version FROM mimeo.schema_version`
	sqlOtherObjects      = `
SELECT count(*) FROM pg_catalog.pg_class c
WHERE c.relnamespace = 'mimeo'::regnamespace AND c.relname <> 'schema_version'
  AND c.relname NOT LIKE 'schema_version%'`
	sqlRecordVersion = `INSERT INTO mimeo.schema_version (version) VALUES ($1)`
)

// Result says what Install did.
type Result struct {
	From      string // version found, "" when mimeo was not installed
	To        string // version now installed
	Extension bool   // installed as a PostgreSQL extension: left alone
}

// Install creates the mimeo schema, or upgrades it to Version. Each script
// runs in its own transaction together with its version row, under an
// advisory lock, so running Install twice, or twice at once, is harmless.
func Install(ctx context.Context, conn *pgx.Conn) (Result, error) {
	return InstallVersion(ctx, conn, Version)
}

// InstallVersion is Install up to a given version (an upgrade test starts
// from an older one).
func InstallVersion(ctx context.Context, conn *pgx.Conn, target string) (Result, error) {
	var extVersion string
	err := conn.QueryRow(ctx, sqlExtensionVersion).Scan(&extVersion)
	if err == nil {
		if compareVersions(extVersion, target) != 0 {
			return Result{From: extVersion, To: extVersion, Extension: true}, fmt.Errorf(
				"mimeo is installed as extension version %s, this binary needs %s: run ALTER EXTENSION mimeo UPDATE TO '%s'",
				extVersion, target, target)
		}
		return Result{From: extVersion, To: extVersion, Extension: true}, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return Result{}, fmt.Errorf("check for mimeo extension: %w", err)
	}

	var res Result
	for {
		done, err := installStep(ctx, conn, target, &res)
		if err != nil || done {
			return res, err
		}
	}
}

// installStep applies the next script, if any, in one transaction.
func installStep(ctx context.Context, conn *pgx.Conn, target string, res *Result) (done bool, err error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, fmt.Errorf("begin install: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()

	if _, err := tx.Exec(ctx, sqlPrepare); err != nil {
		return false, fmt.Errorf("prepare schema mimeo: %w", err)
	}
	current, err := installedVersion(ctx, tx)
	if err != nil {
		return false, err
	}
	if res.From == "" && res.To == "" {
		res.From = current
	}
	res.To = current
	if current == "" {
		var n int
		if err := tx.QueryRow(ctx, sqlOtherObjects).Scan(&n); err != nil {
			return false, fmt.Errorf("inspect schema mimeo: %w", err)
		}
		if n > 0 {
			return false, ErrForeignSchema
		}
	}
	path, err := steps(current, target)
	if err != nil {
		return false, err
	}
	if len(path) == 0 {
		return true, tx.Commit(ctx)
	}
	next := path[0]
	body, err := script(next.name)
	if err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, body); err != nil {
		return false, fmt.Errorf("apply %s: %w", next.name, err)
	}
	if _, err := tx.Exec(ctx, sqlRecordVersion, next.to); err != nil {
		return false, fmt.Errorf("record version %s: %w", next.to, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return false, fmt.Errorf("commit %s: %w", next.name, err)
	}
	res.To = next.to
	return false, nil
}

// installedVersion is the highest recorded version, "" when none.
func installedVersion(ctx context.Context, tx pgx.Tx) (string, error) {
	rows, err := tx.Query(ctx, sqlInstalledVersions)
	if err != nil {
		return "", fmt.Errorf("read mimeo.schema_version: %w", err)
	}
	versions, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return "", fmt.Errorf("read mimeo.schema_version: %w", err)
	}
	best := ""
	for _, v := range versions {
		if best == "" || compareVersions(v, best) > 0 {
			best = v
		}
	}
	return best, nil
}
