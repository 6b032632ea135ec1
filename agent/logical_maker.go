package agent

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/logical"
)

// makeLogical sets up a logical table. Its copy and its stream meet
// exactly: the config is committed first (state copying: the stream keeps
// the table's changes aside), then a temporary slot exports a snapshot at
// its consistent point, the copy runs in that snapshot, and the stream
// applies only changes committed from that point on.
func (a *Agent) makeLogical(ctx context.Context, r *run) error {
	var args logicalMakerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("logical_maker %s: %w", r.dest, err) }
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: args.Dblink, Table: args.SrcTable,
		Filter: args.Filter, Condition: args.Condition, Indexes: true})
	if err != nil {
		return fail(err)
	}
	defer src.Release()
	keys, keyTypes, err := logicalKey(ctx, src, st, args.PkField, args.PkType)
	if err != nil {
		return fail(err)
	}
	if args.Logdel && containsColumn(st.Columns, logical.DeletedColumn) {
		return fail(fmt.Errorf("source column %q clashes with the column logdel adds; leave it out with p_filter", logical.DeletedColumn))
	}
	// A retried maker (the agent died) finds its own first phase.
	if err := a.dropLeftover(ctx, r, "maker request"); err != nil {
		return fail(err)
	}
	if err := withTx(ctx, r.dst, func(tx pgx.Tx) error { return checkNewDestination(ctx, tx, r.dest) }); err != nil {
		return fail(err)
	}
	names, err := logicalNames(ctx, r.dst, args.Dblink)
	if err != nil {
		return fail(err)
	}
	if err := ensurePublication(ctx, src, names, st.Name); err != nil {
		return fail(err)
	}
	r.note(ctx, "Publish source table", fmt.Sprintf("%s is in publication %s", st.Name, names.Publication), false)
	if err := a.resetSlot(ctx, r, src, args.Dblink, names, true); err != nil {
		return fail(err)
	}
	cols, types, err := logical.SourceColumns(ctx, src, st.Name)
	if err != nil {
		return fail(err)
	}
	// Phase one: the table and its config, so the stream keeps its changes.
	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if err := checkNewDestination(ctx, tx, r.dest); err != nil {
			return err
		}
		def := columnDefs(st.Columns)
		if args.Logdel {
			def += ", " + ident.Quote(logical.DeletedColumn) + " timestamptz"
		}
		if _, err := tx.Exec(ctx, "CREATE TABLE "+r.dest.Sanitize()+" ("+def+")"); err != nil {
			return fmt.Errorf("create %s: %w", r.dest, err)
		}
		_, err := tx.Exec(ctx, `INSERT INTO mimeo.refresh_config_logical
    (dest_table, type, dblink, source_table, filter, condition, create_indexes, pk_field, pk_type, logdel, columns, column_types, state, state_detail)
VALUES ($1, 'logical', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'copying', $12)`,
			r.req.DestTable, args.Dblink, st.Name.String(), nullIfEmpty(args.Filter), nullString(args.Condition), args.indexes(),
			keys, keyTypes, args.Logdel, cols, types, fmt.Sprintf("maker request %d", r.req.ID))
		if err != nil {
			return fmt.Errorf("record config: %w", err)
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	err = a.copyLogical(ctx, r, args.Dblink, src, st, names, keys, args.Logdel, args.pull(), args.indexes(), true)
	a.logical.Wake()
	if err != nil {
		if derr := a.dropLeftover(context.WithoutCancel(ctx), r, "maker request"); derr != nil {
			r.log.Warn("cannot remove the table of a failed maker", "error", derr)
		}
		return fail(err)
	}
	return nil
}

// copyLogical is a copy's phase two: a temporary slot's snapshot, the
// copy in it, then state copied with the snapshot's point, committed with
// the request's outcome. The stream applies the changes it kept and the
// table is ready.
func (a *Agent) copyLogical(ctx context.Context, r *run, dblink int, src *pgxpool.Conn, st *sourceTable, names logical.Names,
	keys []string, logdel, pull, indexes, created bool) error {
	rcfg, err := a.sources.replicationConfig(ctx, r.dst, dblink)
	if err != nil {
		return err
	}
	var snap *logical.CopySnapshot
	if err := r.step(ctx, "Export snapshot", func() (string, error) {
		snap, err = logical.NewCopySnapshot(ctx, rcfg)
		if err != nil {
			return "", err
		}
		return "consistent point " + snap.Point.String(), nil
	}); err != nil {
		return err
	}
	defer snap.Close(ctx)
	cp, _, err := a.sources.acquire(ctx, r.dst, dblink)
	if err != nil {
		return err
	}
	defer cp.Release()
	in, err := cp.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return err
	}
	defer func() { _ = in.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := in.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snap.Snapshot)); err != nil {
		return fmt.Errorf("import snapshot: %w", err)
	}
	cfg, err := loadLogicalConfig(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return err
	}
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		var rows int64
		var err error
		if logdel && !created {
			rows, err = r.reloadLogdel(ctx, tx, cp, st, cfg, pull)
		} else {
			// TRUNCATE lets the copy load frozen rows; a table handed to
			// another role, with DML grants only, is emptied with DELETE.
			emptied := false
			if !created {
				if emptied, err = emptyTable(ctx, tx, r.dest); err != nil {
					return err
				}
			}
			rows, err = r.load(ctx, tx, loadSpec{src: cp, table: st, condition: cfg.Condition, target: r.dest, pull: pull,
				emptied: emptied, thawed: emptied})
		}
		if err != nil {
			return err
		}
		if created && indexes {
			if err := r.createIndexes(ctx, tx, st, r.dest); err != nil {
				return err
			}
		}
		if err := ensureKeyIndex(ctx, tx, r.dest, keys); err != nil {
			return err
		}
		if logdel {
			if err := ensureDeletedIndex(ctx, tx, r.dest); err != nil {
				return err
			}
		}
		cols, types, err := logical.SourceColumns(ctx, src, st.Name)
		if err != nil {
			return err
		}
		parts, err := logical.Partitions(ctx, in, st.Name)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE ONLY mimeo.refresh_config_logical SET state = 'copied', state_detail = NULL,
    start_lsn = $2::text::pg_lsn, last_run = $3, columns = $4, column_types = $5, partitions = $6, partition_files = $7
WHERE dest_table = $1`,
			r.req.DestTable, snap.Point.String(), r.started, cols, types, logical.PartitionNames(parts), logical.PartitionFiles(parts)); err != nil {
			return fmt.Errorf("record copy: %w", err)
		}
		if !created {
			if err := markChecksRepaired(ctx, tx, r); err != nil {
				return err
			}
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("copied %d rows at %s; the stream of %s applies changes from there", rows, snap.Point, names.Slot))
	})
}

// reloadLogdel repulls a logdel-flavoured table keeping its history: live
// rows are replaced by the source's, a live row the source no longer has
// is marked deleted (as of the repull), and a deleted row stays unless its
// key is live again.
func (r *run) reloadLogdel(ctx context.Context, tx pgx.Tx, cp *pgxpool.Conn, st *sourceTable, cfg *logicalConfig, pull bool) (int64, error) {
	stage := ident.Name{Schema: "pg_temp", Table: "mimeo_logical_reload"}
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE mimeo_logical_reload ("+columnDefs(unconstrained(st.Columns))+") ON COMMIT DROP"); err != nil {
		return 0, fmt.Errorf("create staging table: %w", err)
	}
	rows, err := r.load(ctx, tx, loadSpec{src: cp, table: st, condition: cfg.Condition, target: stage, pull: pull, emptied: true})
	if err != nil {
		return 0, err
	}
	d := r.dest.Sanitize()
	cols := columnList(st.Columns)
	deleted := ident.Quote(logical.DeletedColumn)
	inStage := "EXISTS (SELECT 1 FROM mimeo_logical_reload k WHERE " + keyMatch(cfg.Keys, "d", "k") + ")"
	if err := execAll(ctx, tx, "reload", []string{
		// Joins of the reload against the table go by the key.
		"CREATE INDEX ON mimeo_logical_reload (" + quoteNames(cfg.Keys) + ")",
		"ANALYZE mimeo_logical_reload",
		"UPDATE " + d + " d SET " + deleted + " = now() WHERE d." + deleted + " IS NULL AND NOT " + inStage,
		"DELETE FROM " + d + " d WHERE " + inStage,
		"INSERT INTO " + d + " (" + cols + ") SELECT " + cols + " FROM mimeo_logical_reload",
	}); err != nil {
		return 0, err
	}
	return rows, nil
}

// dropLeftover removes the table and config a run of this request left in
// phase one (state copying, state_detail naming the request).
func (a *Agent) dropLeftover(ctx context.Context, r *run, what string) error {
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `DELETE FROM ONLY mimeo.refresh_config_logical WHERE dest_table = $1 AND state_detail = $2`,
			r.req.DestTable, fmt.Sprintf("%s %d", what, r.req.ID))
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		_, err = tx.Exec(ctx, "DROP TABLE IF EXISTS "+r.dest.Sanitize())
		return err
	})
}

// emptyTable returns false where the agent may TRUNCATE the table (load
// then truncates it, so COPY may FREEZE); where it may not (a table handed
// to another role, with DML grants) it deletes the rows and returns true.
func emptyTable(ctx context.Context, tx pgx.Tx, t ident.Name) (bool, error) {
	var may bool
	if err := tx.QueryRow(ctx, `SELECT has_table_privilege($1, 'TRUNCATE')`, t.Sanitize()).Scan(&may); err != nil {
		return false, fmt.Errorf("check TRUNCATE on %s: %w", t, err)
	}
	if may {
		return false, nil
	}
	if _, err := tx.Exec(ctx, "DELETE FROM "+t.Sanitize()); err != nil {
		return false, fmt.Errorf("empty %s: %w", t, err)
	}
	return true, nil
}
