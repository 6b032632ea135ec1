package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/logical"
)

// refreshLogical is a sync point: done once the stream has applied every
// source transaction committed before now. With p_repull it copies the
// table again.
func (a *Agent) refreshLogical(ctx context.Context, r *run) error {
	var args refreshLogicalArgs
	if err := r.args(&args); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("refresh_logical %s: %w", r.dest, err) }
	cfg, err := loadLogicalConfig(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return fail(err)
	}
	if args.Repull {
		if err := a.repullLogical(ctx, r, cfg); err != nil {
			return fail(err)
		}
		return nil
	}
	if cfg.State == "failed" || cfg.State == "needs_resync" {
		return fail(fmt.Errorf("the table is %s: %s", strings.ReplaceAll(cfg.State, "_", " "), cfg.Detail))
	}
	src, _, err := a.sources.acquire(ctx, r.dst, cfg.Dblink)
	if err != nil {
		return fail(err)
	}
	target, err := walInsertLSN(ctx, src)
	src.Release()
	if err != nil {
		return fail(err)
	}
	if err := a.waitForStream(ctx, r, cfg.Dblink, target); err != nil {
		return fail(err)
	}
	if err := a.checkLogicalColumns(ctx, r, cfg.Dblink); err != nil {
		return fail(err)
	}
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
			return err
		}
		return r.complete(ctx, tx, 0, "applied everything the source committed up to "+target)
	})
}

// checkLogicalColumns fails the table, and the sync point, when the source
// table's columns changed in a way its copy cannot follow: the stream
// would find it only with the table's next change, and until then the
// sync point would call the copy current.
func (a *Agent) checkLogicalColumns(ctx context.Context, r *run, dblink int) error {
	src, _, err := a.sources.acquire(ctx, r.dst, dblink)
	if err != nil {
		return err
	}
	why, err := logical.ColumnDrift(ctx, src, r.dst, r.req.DestTable)
	src.Release()
	if err != nil || why == "" {
		return err
	}
	r.log.Error("logical table failed; it gets no changes until a repull", "error", why)
	if err := logical.MarkFailed(ctx, r.dst, r.req.DestTable, why); err != nil {
		return fmt.Errorf("%s; and cannot mark the table failed: %w", why, err)
	}
	return errors.New(why)
}

// walInsertLSN is the source's WAL insert position: every transaction
// committed before it (or visible to q's snapshot) ends below it.
func walInsertLSN(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (string, error) {
	var lsn string
	if err := q.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&lsn); err != nil {
		return "", fmt.Errorf("read the source's WAL position: %w", err)
	}
	return lsn, nil
}

// waitForStream waits until the stream of source dblink has applied every
// source transaction that committed before WAL position target, and this
// run's table is ready; it records the wait as a job step.
func (a *Agent) waitForStream(ctx context.Context, r *run, dblink int, target string) error {
	if _, err := r.dst.Exec(ctx, `UPDATE mimeo.logical_source SET sync_lsn = greatest(coalesce(sync_lsn, '0/0'), $2::text::pg_lsn) WHERE dblink = $1`,
		dblink, target); err != nil {
		return err
	}
	timeout := a.cfg.LogicalSyncTimeout
	if timeout <= 0 {
		timeout = 5 * time.Minute
	}
	waitStart := time.Now()
	deadline := waitStart.Add(timeout)
	pause := 5 * time.Millisecond
	for {
		// Taken before the read: a commit of this agent's stream after it
		// ends the pause at once; another agent's is seen by the timer.
		progress := a.logical.Progress()
		var (
			reached       bool
			state, status string
			detail        *string
			applied       *string
		)
		err := r.dst.QueryRow(ctx, `SELECT coalesce(s.applied_lsn >= $2::text::pg_lsn, false), c.state,
       coalesce(c.state_detail, s.status_detail), s.status, s.applied_lsn::text
FROM ONLY mimeo.refresh_config_logical c JOIN mimeo.logical_source s ON s.dblink = c.dblink WHERE c.dest_table = $1`,
			r.req.DestTable, target).Scan(&reached, &state, &detail, &status, &applied)
		if err != nil {
			return err
		}
		switch {
		case state == "failed" || state == "needs_resync":
			return fmt.Errorf("the table is %s: %s", strings.ReplaceAll(state, "_", " "), deref(detail))
		case status == "needs_resync":
			return fmt.Errorf("the source needs a resync: %s", deref(detail))
		case reached && state == "ready":
			r.job.add(ctx, "Wait for the stream", waitStart, jobOK, fmt.Sprintf("the source was at %s; the stream has applied up to %s", target, deref(applied)))
			return nil
		case time.Now().After(deadline):
			why := "status " + status
			if detail != nil {
				why += ": " + *detail
			}
			return fmt.Errorf("the stream has not applied the source's changes up to %s within %s (applied up to %s, table %s, %s)",
				target, timeout, deref(applied), state, why)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-progress:
		case <-time.After(pause):
		}
		pause = min(2*pause, 20*time.Millisecond)
	}
}

// repullLogical copies a table again (and so clears failed and
// needs_resync), rebuilding its columns when the source's changed.
func (a *Agent) repullLogical(ctx context.Context, r *run, cfg *logicalConfig) error {
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: cfg.Dblink, Table: cfg.Source.String(),
		Filter: nullIfEmpty(cfg.Filter), Condition: cfg.Condition, Indexes: true})
	if err != nil {
		return err
	}
	defer src.Release()
	if _, _, err := logicalKey(ctx, src, st, cfg.Keys, cfg.KeyTypes); err != nil {
		return err
	}
	names, err := logicalNames(ctx, r.dst, cfg.Dblink)
	if err != nil {
		return err
	}
	if err := ensurePublication(ctx, src, names, st.Name); err != nil {
		return err
	}
	if err := a.resetSlot(ctx, r, src, cfg.Dblink, names, false); err != nil {
		return err
	}
	// Phase one: the stream keeps the table's changes from here on.
	if _, err := r.dst.Exec(ctx, `WITH c AS (UPDATE ONLY mimeo.refresh_config_logical SET state = 'copying', start_lsn = NULL, state_detail = $2
    WHERE dest_table = $1 RETURNING dest_table)
DELETE FROM mimeo.logical_backlog b USING c WHERE b.dest_table = c.dest_table`, r.req.DestTable, fmt.Sprintf("repull request %d", r.req.ID)); err != nil {
		return fmt.Errorf("mark the table copying: %w", err)
	}
	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		var own []string
		if cfg.Logdel {
			own = []string{logical.DeletedColumn}
		}
		d, err := checkColumns(ctx, tx, r.dest, st, nil, own...)
		if err != nil {
			return err
		}
		if d.none() {
			return nil
		}
		return r.rebuildColumns(ctx, tx, d, st, !cfg.Logdel, cfg.Indexes, nil)
	})
	if err == nil {
		err = a.copyLogical(ctx, r, cfg.Dblink, src, st, names, cfg.Keys, cfg.Logdel, true, cfg.Indexes, false)
	}
	if err != nil {
		// The table gets no changes until a repull succeeds.
		if _, xerr := r.dst.Exec(context.WithoutCancel(ctx), `UPDATE ONLY mimeo.refresh_config_logical SET state = 'failed', state_detail = $2 WHERE dest_table = $1`,
			r.req.DestTable, "repull failed: "+err.Error()); xerr != nil {
			r.log.Warn("cannot mark the table failed", "error", xerr)
		}
		return err
	}
	return nil
}
