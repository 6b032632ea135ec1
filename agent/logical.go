package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/logical"
)

// The logical type's requests. The stream itself is the logical package's
// Engine; these make, resync and remove tables, and meet the stream through
// the destination: a table's state in mimeo.refresh_config_logical, changed
// under the row lock the stream's transactions hold.

type logicalMakerArgs struct {
	makerArgs
	PkField []string `json:"pk_field"`
	PkType  []string `json:"pk_type"`
	Logdel  bool     `json:"logdel"`
}

type refreshLogicalArgs struct {
	Repull bool `json:"repull"`
}

// logicalConfig is a logical table's config.
type logicalConfig struct {
	Dblink    int
	Source    ident.Name
	Filter    []string
	Condition string
	Indexes   bool
	Keys      []string
	KeyTypes  []string
	Logdel    bool
	State     string
	Detail    string
}

func loadLogicalConfig(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, dest string) (*logicalConfig, error) {
	var c logicalConfig
	var src string
	var detail *string
	err := db.QueryRow(ctx, `SELECT dblink, source_table, coalesce(filter, '{}'), coalesce(condition, ''), create_indexes,
       pk_field, pk_type, logdel, state, state_detail
FROM ONLY mimeo.refresh_config_logical WHERE dest_table = $1`, dest).Scan(&c.Dblink, &src, &c.Filter, &c.Condition, &c.Indexes,
		&c.Keys, &c.KeyTypes, &c.Logdel, &c.State, &detail)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%s: %w", dest, ErrNotConfigured)
	}
	if err != nil {
		return nil, fmt.Errorf("read config of %s: %w", dest, err)
	}
	c.Detail = deref(detail)
	if c.Source, err = ident.Parse(src); err != nil {
		return nil, err
	}
	return &c, nil
}

// logicalKey picks the key: the replica identity, which is what pgoutput
// sends for the old row of an UPDATE or DELETE. p_pk_field may name it (or
// any NOT NULL unique columns of a REPLICA IDENTITY FULL table).
func logicalKey(ctx context.Context, src *pgxpool.Conn, st *sourceTable, field, types []string) ([]string, []string, error) {
	ri, full, err := logical.ReplicaIdentity(ctx, src, st.Name)
	if err != nil {
		return nil, nil, err
	}
	if full {
		return updaterKey(st, field, types)
	}
	if len(field) > 0 && !slices.Equal(field, ri) {
		return nil, nil, fmt.Errorf("p_pk_field (%s) must be the replica identity of %s (%s): pgoutput identifies updated and deleted rows by it",
			strings.Join(field, ", "), st.Name, strings.Join(ri, ", "))
	}
	var typs []string
	for _, k := range ri {
		i := indexOfColumn(st.Columns, k)
		if i < 0 {
			return nil, nil, fmt.Errorf("p_filter leaves out key column %s of %s; the key (replica identity) must be copied", ident.Display(k), st.Name)
		}
		typs = append(typs, st.Columns[i].Type)
	}
	if len(types) > 0 {
		typs = types
	}
	return ri, typs, nil
}

// logicalNames returns the slot and publication names of a source,
// recording the source's row on first use. The names carry a random token:
// slots are per source cluster, and destinations made from one template
// database share their mimeo.instance.
func logicalNames(ctx context.Context, dst *pgxpool.Conn, dblink int) (logical.Names, error) {
	token := make([]byte, 6)
	_, _ = rand.Read(token)
	n := logical.NamesFor(hex.EncodeToString(token), dblink)
	var names logical.Names
	err := dst.QueryRow(ctx, `INSERT INTO mimeo.logical_source (dblink, slot_name, publication) VALUES ($1, $2, $3)
ON CONFLICT (dblink) DO UPDATE SET dblink = EXCLUDED.dblink RETURNING slot_name, publication`, dblink, n.Slot, n.Publication).Scan(&names.Slot, &names.Publication)
	if err != nil {
		return names, fmt.Errorf("record logical source %d: %w", dblink, err)
	}
	return names, nil
}

// ensurePublication adds the table to the source's publication.
func ensurePublication(ctx context.Context, src *pgxpool.Conn, names logical.Names, table ident.Name) error {
	tx, err := beginWrite(ctx, src)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	var role string
	if err := tx.QueryRow(ctx, `SELECT current_user`).Scan(&role); err != nil {
		return err
	}
	if err := logical.EnsurePublication(ctx, tx, names.Publication, table, role); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// resetSlot (re)creates the source's permanent slot when nothing streams
// from it that must go on: the first table of a source, a source whose
// slot needs a resync, or one left over. The stream lock keeps the stream
// away meanwhile; applied_lsn starts at the new slot's consistent point.
// except is the table being made or repulled.
func (a *Agent) resetSlot(ctx context.Context, r *run, src *pgxpool.Conn, dblink int, names logical.Names, maker bool) error {
	need := func(q interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) (bool, error) {
		var need bool
		err := q.QueryRow(ctx, `SELECT s.applied_lsn IS NULL OR s.status = 'needs_resync'
    OR ($3 AND NOT EXISTS (SELECT 1 FROM ONLY mimeo.refresh_config_logical c WHERE c.dblink = s.dblink AND c.dest_table <> $2))
FROM mimeo.logical_source s WHERE s.dblink = $1`, dblink, r.req.DestTable, maker).Scan(&need)
		return need, err
	}
	if ok, err := need(r.dst); err != nil || !ok {
		return err
	}
	return r.step(ctx, "Create replication slot", func() (string, error) {
		rcfg, err := a.sources.replicationConfig(ctx, r.dst, dblink)
		if err != nil {
			return "", err
		}
		var point pglogrepl.LSN
		err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
			// The stream of this source stops when it has no table left or
			// needs a resync; wait for it to let go.
			if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '60s'`); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, logical.SQLStreamLock, dblink); err != nil {
				return fmt.Errorf("wait for the stream of source %d to stop: %w", dblink, err)
			}
			if ok, err := need(tx); err != nil || !ok {
				return err
			}
			if err := logical.DropSlot(ctx, src, names.Slot); err != nil {
				return err
			}
			repl, err := pgconnConnect(ctx, rcfg)
			if err != nil {
				return err
			}
			defer func() { _ = repl.Close(context.WithoutCancel(ctx)) }()
			var sys string
			if point, sys, err = logical.CreateSlot(ctx, repl, names.Slot); err != nil {
				return err
			}
			_, err = tx.Exec(ctx, `UPDATE mimeo.logical_source SET applied_lsn = $2::text::pg_lsn, applied_at = now(), system_identifier = $3,
    status = 'new', status_detail = NULL, sync_lsn = NULL WHERE dblink = $1`, dblink, point.String(), sys)
			return err
		})
		return fmt.Sprintf("created slot %s at %s", names.Slot, point), err
	})
}

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
			rows, err = r.load(ctx, tx, loadSpec{src: cp, table: st, condition: cfg.Condition, target: r.dest, pull: pull})
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
    start_lsn = $2::text::pg_lsn, last_run = $3, columns = $4, column_types = $5, partitions = $6 WHERE dest_table = $1`,
			r.req.DestTable, snap.Point.String(), r.started, cols, types, parts); err != nil {
			return fmt.Errorf("record copy: %w", err)
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("copied %d rows at %s; the stream of %s applies changes from there", rows, snap.Point, names.Slot))
	})
}

// reloadLogdel repulls a logdel-flavoured table keeping its history: live
// rows are replaced by the source's; a deleted row stays unless its key is
// live again.
func (r *run) reloadLogdel(ctx context.Context, tx pgx.Tx, cp *pgxpool.Conn, st *sourceTable, cfg *logicalConfig, pull bool) (int64, error) {
	stage := ident.Name{Schema: "pg_temp", Table: "mimeo_logical_reload"}
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE mimeo_logical_reload ("+columnDefs(unconstrained(st.Columns))+") ON COMMIT DROP"); err != nil {
		return 0, fmt.Errorf("create staging table: %w", err)
	}
	rows, err := r.load(ctx, tx, loadSpec{src: cp, table: st, condition: cfg.Condition, target: stage, pull: pull})
	if err != nil {
		return 0, err
	}
	d := r.dest.Sanitize()
	cols := columnList(st.Columns)
	if err := execAll(ctx, tx, "reload", []string{
		"DELETE FROM " + d + " d WHERE d." + ident.Quote(logical.DeletedColumn) + " IS NULL OR EXISTS (SELECT 1 FROM mimeo_logical_reload k WHERE " +
			keyMatch(cfg.Keys, "d", "k") + ")",
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
	var target string
	err = src.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&target)
	src.Release()
	if err != nil {
		return fail(fmt.Errorf("read the source's WAL position: %w", err))
	}
	if _, err := r.dst.Exec(ctx, `UPDATE mimeo.logical_source SET sync_lsn = greatest(coalesce(sync_lsn, '0/0'), $2::text::pg_lsn) WHERE dblink = $1`,
		cfg.Dblink, target); err != nil {
		return fail(err)
	}
	timeout := a.cfg.LogicalSyncTimeout
	if timeout <= 0 {
		timeout = 5 * time.Minute
	}
	deadline := time.Now().Add(timeout)
	pause := 5 * time.Millisecond
	for {
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
			return fail(err)
		}
		switch {
		case state == "failed" || state == "needs_resync":
			return fail(fmt.Errorf("the table is %s: %s", strings.ReplaceAll(state, "_", " "), deref(detail)))
		case status == "needs_resync":
			return fail(fmt.Errorf("the source needs a resync: %s", deref(detail)))
		case reached && state == "ready":
			return withTx(ctx, r.dst, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
					return err
				}
				return r.complete(ctx, tx, 0, "applied everything the source committed up to "+target)
			})
		case time.Now().After(deadline):
			why := "status " + status
			if detail != nil {
				why += ": " + *detail
			}
			return fail(fmt.Errorf("the stream has not applied the source's changes up to %s within %s (applied up to %s, table %s, %s)",
				target, timeout, deref(applied), state, why))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pause):
		}
		pause = min(2*pause, 100*time.Millisecond)
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
	src, _, err := a.sources.acquire(ctx, r.dst, cfg.Dblink)
	if err != nil {
		return fail(fmt.Errorf("%w (the source's publication must be changed first; fix the connection and retry)", err))
	}
	defer src.Release()
	if sameTable == 0 {
		tx, err := beginWrite(ctx, src)
		if err != nil {
			return fail(err)
		}
		err = logical.DropFromPublication(ctx, tx, names.Publication, cfg.Source)
		if err == nil {
			err = tx.Commit(ctx)
		}
		_ = tx.Rollback(context.WithoutCancel(ctx))
		if err != nil {
			return fail(err)
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
	if others > 0 {
		return withTx(ctx, r.dst, func(tx pgx.Tx) error { return r.complete(ctx, tx, 0, msg) })
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
