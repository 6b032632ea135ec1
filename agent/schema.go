package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"

	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

// An agent runs requests only against the schema version it was built
// for. Three things keep it so: the version check at start and at every
// heartbeat (which stops the agent when the schema changes under it), the
// database itself, whose trigger on mimeo.request refuses a claim by an
// agent of another version, and the schema lock: every run holds it shared
// from before it reads the version until it ends, and an upgrade takes it
// exclusively, so no run straddles an upgrade.

// ErrSchemaMissing means the destination has no (or an outdated) mimeo schema.
var ErrSchemaMissing = errors.New("mimeo schema is not installed at this binary's version")

// ErrSchemaChanged means the destination's mimeo schema changed to a
// version this agent does not know while it ran: it stopped claiming and
// exits, so a supervisor can start the matching binary.
var ErrSchemaChanged = errors.New("mimeo schema version changed under the running agent")

const (
	sqlSchemaLockShared   = `SELECT pg_advisory_lock_shared(mimeo.schema_lock_key())`
	sqlSchemaUnlockShared = `SELECT pg_advisory_unlock_shared(mimeo.schema_lock_key())`
)

// checkSchema refuses to start against a schema of another version.
func (a *Agent) checkSchema(ctx context.Context) error {
	if err := a.pool.Ping(ctx); err != nil {
		return fmt.Errorf("connect to destination: %w", ServerError(err))
	}
	version, err := mimeosql.InstalledVersion(ctx, a.pool)
	switch {
	case errors.Is(err, mimeosql.ErrNotInstalled):
		version = "none"
	case err != nil:
		return fmt.Errorf("check mimeo schema: %w", err)
	}
	if version != mimeosql.Version {
		return fmt.Errorf("%w (found %s, need %s): %s", ErrSchemaMissing, version, mimeosql.Version, upgradeAdvice(version))
	}
	return nil
}

// upgradeAdvice says what to do about a schema of version found.
func upgradeAdvice(found string) string {
	if found != "none" && found != "" && mimeosql.CompareVersions(found, mimeosql.Version) > 0 {
		return "run mimeo-agent " + found + " instead"
	}
	return "run mimeo-agent install (it upgrades the schema)"
}

// checkSchemaVersion stops the agent when the schema is no longer the
// version it runs for (an upgrade, or a restored dump of another release).
func (a *Agent) checkSchemaVersion(ctx context.Context) {
	version, err := mimeosql.InstalledVersion(ctx, a.pool)
	switch {
	case errors.Is(err, mimeosql.ErrNotInstalled):
		version = "none"
	case err != nil:
		if ctx.Err() == nil {
			a.log.Warn("cannot check the mimeo schema version", "error", err)
		}
		return
	}
	if version != mimeosql.Version {
		a.schemaChanged(version)
	}
}

// schemaChanged stops claiming, once: it says why in the log and in the
// agent's row, and ends Run with ErrSchemaChanged after the requests in
// flight.
func (a *Agent) schemaChanged(found string) {
	a.schemaOnce.Do(func() {
		detail := fmt.Sprintf("the mimeo schema is now %s but this agent runs for %s: stopped claiming; %s",
			found, mimeosql.Version, upgradeAdvice(found))
		a.log.Error("mimeo schema version changed; stopping", "found", found, "expected", mimeosql.Version,
			"advice", upgradeAdvice(found))
		ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
		defer cancel()
		if _, err := a.pool.Exec(ctx, sqlStopping, a.agentID(), detail); err != nil {
			a.log.Warn("cannot mark agent row stopping", "error", err)
		}
		if a.stopRun != nil {
			a.stopRun(fmt.Errorf("%w: %s", ErrSchemaChanged, detail))
		}
	})
}

// holdSchema takes the schema lock shared on a run's connection, waiting
// for an upgrade in progress, then checks the version the run would work
// against. The lock is released with the run's table lock (or its
// connection).
func (a *Agent) holdSchema(ctx context.Context, conn *pgxpool.Conn) error {
	if _, err := conn.Exec(ctx, sqlSchemaLockShared); err != nil {
		return fmt.Errorf("take schema lock: %w", err)
	}
	version, err := mimeosql.InstalledVersion(ctx, conn)
	if err != nil && !errors.Is(err, mimeosql.ErrNotInstalled) {
		return fmt.Errorf("check mimeo schema: %w", err)
	}
	if version != mimeosql.Version {
		a.schemaChanged(version)
		return fmt.Errorf("%w: found %q, this agent runs for %s", ErrSchemaChanged, version, mimeosql.Version)
	}
	return nil
}
