package sql

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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

	// Every run of an agent (0.4.0 and later) holds this key shared, and
	// every upgrade takes it exclusively (mimeo.schema_lock_key() says the
	// same): an upgrade waits for the runs in flight, and none starts until
	// it has committed and the agents have seen the new version.
	sqlTrySchemaLock = `SELECT pg_try_advisory_xact_lock(1835625831)`
	sqlSchemaLock    = `SELECT pg_advisory_xact_lock(1835625831)`
	sqlRunningCount  = `SELECT count(*) FROM mimeo.request WHERE status = 'running'`
)

// Result says what Install did.
type Result struct {
	From      string // version found, "" when mimeo was not installed
	To        string // version now installed
	Extension bool   // installed as a PostgreSQL extension: left alone
}

// Installer installs or upgrades the mimeo schema from a set of scripts.
type Installer struct {
	// Scripts holds the mimeo--*.sql files; nil means the embedded ones.
	Scripts fs.FS
	// Target is the version to reach; "" means Version.
	Target string
	// Waiting, when set, is told once that an upgrade waits for requests
	// that agents are running now.
	Waiting func(message string)
}

// Install creates the mimeo schema, or upgrades it to Version. Each script
// runs in its own transaction together with its version row, under an
// advisory lock, so running Install twice, or twice at once, is harmless.
func Install(ctx context.Context, conn *pgx.Conn) (Result, error) {
	return Installer{}.Run(ctx, conn)
}

// Run installs or upgrades the schema on conn.
func (in Installer) Run(ctx context.Context, conn *pgx.Conn) (Result, error) {
	if in.Scripts == nil {
		in.Scripts = files
	}
	if in.Target == "" {
		in.Target = Version
	}
	target := in.Target
	var extVersion string
	err := conn.QueryRow(ctx, sqlExtensionVersion).Scan(&extVersion)
	if err == nil {
		if CompareVersions(extVersion, target) != 0 {
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
		done, err := in.step(ctx, conn, &res)
		if err != nil || done {
			return res, err
		}
	}
}

// step applies the next script, if any, in one transaction.
func (in Installer) step(ctx context.Context, conn *pgx.Conn, res *Result) (done bool, err error) {
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
	path, err := steps(in.Scripts, current, in.Target)
	if err != nil {
		return false, err
	}
	if len(path) == 0 {
		return true, tx.Commit(ctx)
	}
	if current != "" {
		if err := in.lockSchema(ctx, tx); err != nil {
			return false, err
		}
	}
	next := path[0]
	body, err := script(in.Scripts, next.name)
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

// lockSchema takes the schema lock for an upgrade, saying so first when
// runs in flight make it wait.
func (in Installer) lockSchema(ctx context.Context, tx pgx.Tx) error {
	var free bool
	if err := tx.QueryRow(ctx, sqlTrySchemaLock).Scan(&free); err != nil {
		return fmt.Errorf("take schema lock: %w", err)
	}
	if free {
		return nil
	}
	if in.Waiting != nil {
		var running int
		_ = tx.QueryRow(ctx, sqlRunningCount).Scan(&running)
		in.Waiting(fmt.Sprintf("waiting for the %d requests agents are running now to finish; none starts until the upgrade is done", running))
	}
	if _, err := tx.Exec(ctx, sqlSchemaLock); err != nil {
		return fmt.Errorf("take schema lock: %w", err)
	}
	return nil
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
		if best == "" || CompareVersions(v, best) > 0 {
			best = v
		}
	}
	return best, nil
}

// Querier is what InstalledVersion needs: a pool or a connection (not a
// transaction: a failed first probe would abort it).
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ErrNotInstalled means the database has no mimeo schema.
var ErrNotInstalled = errors.New("mimeo is not installed")

const (
	sqlInstalledVersion = `SELECT mimeo.installed_version()`
	// Before 0.4.0 there was no mimeo.installed_version().
	sqlLegacyVersion = `
SELECT coalesce((SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'mimeo'),
                (SELECT max(version) FROM mimeo.schema_version))`
)

// InstalledVersion is the mimeo schema version db holds, however it was
// installed (mimeo-agent install, CREATE EXTENSION, or a restored dump);
// ErrNotInstalled when there is none.
func InstalledVersion(ctx context.Context, db Querier) (string, error) {
	var v string
	err := db.QueryRow(ctx, sqlInstalledVersion).Scan(&v)
	if err == nil {
		return v, nil
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return "", fmt.Errorf("read mimeo schema version: %w", err)
	}
	switch pgErr.Code {
	case "3F000": // invalid_schema_name: no schema mimeo
		return "", ErrNotInstalled
	case "42883": // undefined_function: older than 0.4.0, or not mimeo's
	default:
		return "", fmt.Errorf("read mimeo schema version: %w", err)
	}
	var legacy *string
	if err := db.QueryRow(ctx, sqlLegacyVersion).Scan(&legacy); err != nil || legacy == nil {
		return "", ErrNotInstalled
	}
	return *legacy, nil
}
