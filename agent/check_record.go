package agent

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/queue"
)

// checkRow is one row of mimeo.validation.
type checkRow struct {
	Dest       string // "" for none
	Kind       string // rowcount, checksum, columns, missing, snapshot_monitor
	OK         bool
	SourceRows *int64
	DestRows   *int64
	Chunks     int
	Differing  int
	Repaired   *bool
	Detail     string
}

// message is the check's outcome in words, for the request row.
func (c checkRow) message() string {
	if c.OK {
		return "ok: " + c.Detail
	}
	return "differs: " + c.Detail
}

const sqlRecordCheck = `
INSERT INTO mimeo.validation (request_id, dest_table, kind, ok, source_rows, dest_rows, chunks_checked, chunks_differing, repaired, detail)
VALUES ($1, nullif($2, ''), $3, $4, $5, $6, CASE WHEN $3 = 'checksum' THEN $7::int END, CASE WHEN $3 = 'checksum' THEN $8::int END, $9, $10)`

// recordCheck writes a check's row, as part of run r.
func recordCheck(ctx context.Context, db queue.DB, r *run, c checkRow) error {
	if _, err := db.Exec(ctx, sqlRecordCheck, r.req.ID, c.Dest, c.Kind, c.OK, c.SourceRows, c.DestRows,
		c.Chunks, c.Differing, c.Repaired, c.Detail); err != nil {
		return fmt.Errorf("record the result in mimeo.validation: %w", err)
	}
	return nil
}

// completeChecks records the checks' rows and ends the run with message,
// in one transaction.
func (r *run) completeChecks(ctx context.Context, message string, checks ...checkRow) error {
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		for _, c := range checks {
			if err := recordCheck(ctx, tx, r, c); err != nil {
				return err
			}
		}
		return r.complete(ctx, tx, 0, message)
	})
}

// markChecksRepaired records that a repull repaired the differences the
// table's earlier checks found, so that refresh_status stops calling it
// invalid for them.
func markChecksRepaired(ctx context.Context, tx pgx.Tx, r *run) error {
	if _, err := tx.Exec(ctx, `UPDATE mimeo.validation SET repaired = true,
    detail = coalesce(detail || '; ', '') || 'repaired by the repull of request ' || $2::bigint
WHERE dest_table = $1 AND kind IN ('rowcount', 'checksum', 'columns') AND NOT ok AND repaired IS NOT TRUE`, r.req.DestTable, r.req.ID); err != nil {
		return fmt.Errorf("record the earlier checks as repaired: %w", err)
	}
	return nil
}
