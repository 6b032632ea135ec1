package agent

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/logical"
)

// destroyLogical takes the table out of its source's publication and drops
// it (unless ARCHIVE); the last table of a source also takes the slot and
// the publication with it.
func (a *Agent) destroyLogical(ctx context.Context, r *run) error {
	var args destroyerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("logical_destroyer %s: %w", r.dest, err) }
	cfg, err := loadLogicalConfig(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return fail(err)
	}
	var names logical.Names
	var sameTable, others int
	if err := r.dst.QueryRow(ctx, `SELECT s.slot_name, s.publication,
       (SELECT count(*) FROM ONLY mimeo.refresh_config_logical c WHERE c.dblink = s.dblink AND c.dest_table <> $2 AND c.source_table = $3),
       (SELECT count(*) FROM ONLY mimeo.refresh_config_logical c WHERE c.dblink = s.dblink AND c.dest_table <> $2)
FROM mimeo.logical_source s WHERE s.dblink = $1`, cfg.Dblink, r.req.DestTable, cfg.Source.String()).Scan(&names.Slot, &names.Publication, &sameTable, &others); err != nil {
		return fail(fmt.Errorf("read logical source %d: %w", cfg.Dblink, err))
	}
	// With p_force, a source that cannot be reached or changed is left as
	// it is, and the message says what to run there.
	var left []string
	src, _, err := a.sources.acquire(ctx, r.dst, cfg.Dblink)
	if err != nil {
		if !args.Force || ctx.Err() != nil {
			return fail(fmt.Errorf("%w (the source's publication must be changed first; fix the connection and retry, or use p_force => true)", err))
		}
		r.note(ctx, "Connect to source", fmt.Sprintf("p_force: cannot reach source %d (%v); the source side stays", cfg.Dblink, err), true)
		src = nil
	} else {
		defer src.Release()
	}
	if sameTable == 0 {
		if src != nil {
			err = func() error {
				tx, err := beginWrite(ctx, src)
				if err != nil {
					return err
				}
				defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
				if err := logical.DropFromPublication(ctx, tx, names.Publication, cfg.Source); err != nil {
					return err
				}
				return tx.Commit(ctx)
			}()
			if err != nil && (!args.Force || ctx.Err() != nil) {
				return fail(err)
			}
		}
		if src == nil || err != nil {
			left = append(left, fmt.Sprintf("ALTER PUBLICATION %s DROP TABLE %s;", ident.Quote(names.Publication), cfg.Source.Sanitize()))
		}
	}
	msg := "kept " + r.dest.String() + " as a plain table"
	if err := withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if !args.Archive {
			if _, err := tx.Exec(ctx, "DROP TABLE IF EXISTS "+r.dest.Sanitize()); err != nil {
				return err
			}
			msg = "dropped " + r.dest.String()
		}
		_, err := tx.Exec(ctx, `DELETE FROM ONLY mimeo.refresh_config_logical WHERE dest_table = $1`, r.req.DestTable)
		return err
	}); err != nil {
		return fail(err)
	}
	leftMsg := func() string {
		if len(left) == 0 {
			return ""
		}
		return fmt.Sprintf("; p_force: the source side stays on source %d; run there, as a superuser or the publication's owner: %s",
			cfg.Dblink, strings.Join(left, " "))
	}
	if others > 0 {
		return withTx(ctx, r.dst, func(tx pgx.Tx) error { return r.complete(ctx, tx, 0, msg+leftMsg()) })
	}
	// forgetSource drops the destination's record of a source that cannot
	// be reached (p_force): its slot and publication stay there.
	forgetSource := func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM mimeo.logical_source WHERE dblink = $1`, cfg.Dblink); err != nil {
			return err
		}
		left = []string{fmt.Sprintf("SELECT pg_drop_replication_slot(%s); DROP PUBLICATION %s;", quoteLiteral(names.Slot), ident.Quote(names.Publication))}
		return r.complete(ctx, tx, 0, msg+leftMsg()+" (its last logical table: the slot keeps WAL on the source until it is dropped)")
	}
	// The last table: the stream stops (it has nothing left), then the
	// slot and the publication go.
	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '60s'`); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, logical.SQLStreamLock, cfg.Dblink); err != nil {
			return fmt.Errorf("wait for the stream of source %d to stop: %w", cfg.Dblink, err)
		}
		var left bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM ONLY mimeo.refresh_config_logical WHERE dblink = $1)`, cfg.Dblink).Scan(&left); err != nil {
			return err
		}
		if left { // a maker added a table meanwhile: the slot stays
			return r.complete(ctx, tx, 0, msg)
		}
		if src == nil {
			return forgetSource(ctx, tx)
		}
		if err := logical.DropSlot(ctx, src, names.Slot); err != nil {
			return err
		}
		if err := execSource(ctx, src, []string{"DROP PUBLICATION IF EXISTS " + ident.Quote(names.Publication)}); err != nil {
			return fmt.Errorf("drop publication %s: %w", names.Publication, err)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM mimeo.logical_source WHERE dblink = $1`, cfg.Dblink); err != nil {
			return err
		}
		return r.complete(ctx, tx, 0, msg+"; dropped slot and publication "+names.Slot+" on the source (its last logical table)")
	})
	if err != nil {
		_, _ = r.dst.Exec(context.WithoutCancel(ctx), `UPDATE mimeo.logical_source SET status = 'stopped', status_detail = $2 WHERE dblink = $1`, cfg.Dblink,
			fmt.Sprintf("no tables left, but slot %s and publication %s could not be dropped: %v. On the source run: SELECT pg_drop_replication_slot(%s); DROP PUBLICATION %s;",
				names.Slot, names.Publication, err, quoteLiteral(names.Slot), ident.Quote(names.Publication)))
		return fail(fmt.Errorf("%s, but the source's slot and publication remain: %w (on the source run: SELECT pg_drop_replication_slot(%s); DROP PUBLICATION %s;)",
			msg, err, quoteLiteral(names.Slot), ident.Quote(names.Publication)))
	}
	return nil
}
