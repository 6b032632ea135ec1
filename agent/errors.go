package agent

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
)

// Sentinel errors a failed request's message starts from.
var (
	// ErrUnknownSource means no dblink_mapping row has the configured id.
	ErrUnknownSource = errors.New("no such source in mimeo.dblink_mapping")
	// ErrSourceTableMissing means the source table does not exist or the
	// replication role cannot see it.
	ErrSourceTableMissing = errors.New("source table does not exist or is not visible to the replication role")
	// ErrNotConfigured means the destination table is not replicated.
	ErrNotConfigured = errors.New("destination table is not configured")
	// ErrDestinationExists means a maker found its destination name taken.
	ErrDestinationExists = errors.New("destination table already exists")
	// ErrColumnsChanged means a plain table's source columns no longer
	// match the destination (the table type does not recreate tables).
	ErrColumnsChanged = errors.New("source columns changed")
	// ErrOwnerUnreachable means a destination relation belongs to a role
	// the agent cannot give its re-created replacement to; the message
	// says what to grant.
	ErrOwnerUnreachable = errors.New("cannot re-create a destination relation with its owner")
	// ErrUnknownAction means a request names an action this agent lacks.
	ErrUnknownAction = errors.New("unknown request action")
	// errTakenOver means the request was recovered and handed to another
	// agent while this one ran it; the work is rolled back.
	errTakenOver = errors.New("request was taken over by another agent while running; rolled back")
)

// SQLSTATEs the agent reacts to, all in one place.
const (
	codeLockNotAvailable  = "55P03" // lock_timeout ran out
	codeUndefinedTable    = "42P01"
	codeInvalidSchemaName = "3F000"
)

// hasCode reports whether err wraps a PostgreSQL error with that SQLSTATE.
func hasCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}

// ServerError reduces the error of a failed connection attempt to what the
// DBA needs. pgx joins the errors of every attempt it made: with
// sslmode=prefer (libpq's default) it tries TLS first and then plaintext,
// so a wrong password would read "tls error: server refused TLS
// connection" before the password failure. The server's own answer (a
// wrong password, an unknown database, no pg_hba.conf entry) is what tells
// the DBA what to fix; without one, one of the attempts' identical
// failures is. Other errors are returned as they are.
func ServerError(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr
	}
	// No answer from a server: each attempt failed alike (a refused or
	// timed-out dial); one of them says it.
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) {
		if joined, ok := ce.Unwrap().(interface{ Unwrap() []error }); ok && len(joined.Unwrap()) > 0 {
			return fmt.Errorf("user=%s database=%s: %w", ce.Config.User, ce.Config.Database, joined.Unwrap()[0])
		}
	}
	return err
}
