package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// dbTimeout bounds the small bookkeeping writes made after a run's own
// context may have ended (outcome, job log, agent row).
const dbTimeout = 10 * time.Second

// beginner starts transactions: a pool, a connection or a pool connection.
type beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// withTx runs fn in a transaction and commits it when fn succeeds. The
// rollback runs without ctx's cancellation, so a cancelled run still
// leaves its connection clean (or closed).
func withTx(ctx context.Context, db beginner, fn func(tx pgx.Tx) error) error {
	tx, err := db.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}
