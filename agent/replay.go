package agent

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/triggers"
)

// refreshQueued replays the queue in batches until it is empty, then
// applies the TRUNCATEs queued meanwhile; or, with p_repull, reloads the
// table at a point consistent with the queue (rebuilding it first when the
// source's columns changed).
func (a *Agent) refreshQueued(ctx context.Context, r *run, typ string) error {
	var args incRefreshArgs
	if err := r.args(&args); err != nil {
		return err
	}
	cfg, err := loadQueueConfig(ctx, r.dst, typ, r.req.DestTable)
	if err != nil {
		return err
	}
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: cfg.Dblink, Table: cfg.Source, Filter: cfg.Filter,
		Condition: cfg.Condition, Indexes: args.Repull && cfg.Indexes})
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	defer src.Release()
	var queueExists bool
	if err := src.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, cfg.Names.Queue.Sanitize()).Scan(&queueExists); err != nil {
		return fmt.Errorf("refresh %s: look up queue: %w", r.dest, err)
	}
	if !queueExists {
		return fmt.Errorf("refresh %s: the source queue %s is missing: recreate the table with %s_destroyer and %s_maker", r.dest, cfg.Names.Queue, typ, typ)
	}
	// Before anything else: writes to the source must go on being queued
	// whatever is wrong with the destination.
	vanished, err := a.syncSourceObjects(ctx, r, src, cfg, st)
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	diff, err := checkColumns(ctx, r.dst, r.dest, st, cfg.Columns, deletedColumn)
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	if slices.ContainsFunc(diff.Retyped, func(c retyped) bool { return slices.Contains(cfg.PkField, c.Now.Name) }) {
		// A key retyped beyond its kind makes the source's writes fail
		// until the queue follows: at once, not at the repull.
		if err := retypeQueueKeys(ctx, src, cfg, st); err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
	}
	if args.Repull {
		if typ == "logdel" {
			// A TRUNCATE queued before the repull still marks its rows
			// deleted: logdel keeps them.
			if err := a.pruneVanished(ctx, r, src, cfg, st, vanished); err != nil {
				return fmt.Errorf("repull %s: %w", r.dest, err)
			}
		}
		return a.repullQueued(ctx, r, src, cfg, st, diff)
	}
	if !diff.none() {
		return fmt.Errorf("refresh %s: %w", r.dest, columnsChangedError(st, diff, typ, r.req.DestTable))
	}
	limit := cfg.BatchLimit
	if args.Limit != nil {
		limit = *args.Limit
	}
	batches, err := a.replayBatches(ctx, r, src, cfg, st, limit)
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	// After the replay, so that logdel has recorded the deletions queued
	// with their values before a TRUNCATE marks the rest.
	if err := a.pruneVanished(ctx, r, src, cfg, st, vanished); err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	total := r.committed
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
			return fmt.Errorf("record run: %w", err)
		}
		if cfg.Columns == nil { // made before mimeo 0.4.0: record what it was built with
			if err := recordColumns(ctx, tx, typ, r.req.DestTable, st); err != nil {
				return err
			}
		}
		msg := fmt.Sprintf("replayed %s; %d rows written", plural(batches, "batch", "batches"), total)
		r.note(ctx, "Summary", msg, false)
		return r.complete(ctx, tx, total, msg)
	})
}

// recordColumns records the source columns a destination is built with.
func recordColumns(ctx context.Context, tx pgx.Tx, typ, dest string, st *sourceTable) error {
	if _, err := tx.Exec(ctx, "UPDATE "+typeConfigTable(typ)+" SET columns = $2 WHERE dest_table = $1", dest, columnNames(st.Columns)); err != nil {
		return fmt.Errorf("record columns: %w", err)
	}
	return nil
}

// sqlKeyedJoins makes the keyed deletes of a batch use the destination's
// key index: with the default costs (and staging tables never analyzed)
// the planner likes to hash the staged keys and scan the whole table
// instead, a cost that grows with the table rather than with the batch.
const sqlKeyedJoins = `SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off`

// sqlAnyJoins undoes sqlKeyedJoins for what follows in the transaction.
const sqlAnyJoins = `SET LOCAL enable_hashjoin = on; SET LOCAL enable_mergejoin = on`

// existsColumn marks, in the staging table, a key of the batch the source has,
// whether inside the condition or not: a logdel key the source lost without
// a deletion queued (TRUNCATE) is left for pruneVanished to mark.
const existsColumn = "mimeo_exists"

// presentColumn marks, in the staging table, a key of the batch whose row the
// source still has (the other columns are NULL when it does not).
const presentColumn = "mimeo_present"

// queuedRowsSQL is the COPY that brings each key of the queue entries that
// pass entries (a condition) with the source's current row for it, if any,
// so the queue is read once per batch: key columns from the queue (cast
// back from its wider types), the others from the source row, then
// presentColumn and existsColumn.
func queuedRowsSQL(cfg *queueConfig, st *sourceTable, entries string) string {
	var picks []string
	for _, c := range st.Columns {
		if slices.Contains(cfg.PkField, c.Name) {
			picks = append(picks, "k."+ident.Quote(c.Name)+"::"+c.Type)
		} else {
			picks = append(picks, "t."+ident.Quote(c.Name))
		}
	}
	// The condition is written against the source table alone, so it is
	// applied in a subquery of its own.
	rows, inCondition := st.Name.Sanitize(), "t."+ident.Quote(cfg.PkField[0])+" IS NOT NULL"
	if cfg.Condition != "" {
		rows = "(SELECT *, " + strings.TrimPrefix(whereClause(cfg.Condition), "WHERE ") + " AS mimeo_in_condition FROM " + st.Name.Sanitize() + ")"
		inCondition = "t.mimeo_in_condition IS TRUE"
	}
	return "COPY (SELECT " + strings.Join(picks, ", ") + ", " + inCondition + ", t." + ident.Quote(cfg.PkField[0]) + " IS NOT NULL" +
		" FROM (SELECT DISTINCT " + quoteNames(cfg.PkField) + " FROM " + cfg.Names.Queue.Sanitize() + " WHERE " + entries + ") k" +
		" LEFT JOIN " + rows + " t ON " + keyMatch(cfg.PkField, "t", "k") + ") TO STDOUT (FORMAT binary)"
}

// applyQueued applies a batch inside the destination's tx: delete
// its keys and insert the source's current rows for them (logdel: and the
// last values of rows deleted on the source, marked deleted). rows is the
// output of queuedRowsSQL, deleted (logdel) that of deletionsSQL.
func applyQueued(ctx context.Context, tx pgx.Tx, cfg *queueConfig, st *sourceTable, dest ident.Name, rows, deleted io.Reader) (int64, error) {
	cols := columnList(st.Columns)
	stage := ident.Quote("mimeo_stage_rows")
	present := ident.Quote(presentColumn)
	exists := ident.Quote(existsColumn)
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+stage+" ("+columnDefs(unconstrained(st.Columns))+", "+present+" boolean, "+
		exists+" boolean) ON COMMIT DROP"); err != nil {
		return 0, fmt.Errorf("create staging table: %w", err)
	}
	if _, err := tx.Conn().PgConn().CopyFrom(ctx, rows, "COPY "+stage+" ("+cols+", "+present+", "+exists+") FROM STDIN (FORMAT binary, FREEZE)"); err != nil {
		return 0, fmt.Errorf("copy queued keys and current rows: %w", err)
	}
	d := dest.Sanitize()
	if cfg.Type == "dml" {
		if err := execAll(ctx, tx, "apply", []string{
			sqlKeyedJoins,
			"DELETE FROM " + d + " d USING " + stage + " k WHERE " + keyMatch(cfg.PkField, "d", "k"),
			sqlAnyJoins,
		}); err != nil {
			return 0, err
		}
		tag, err := tx.Exec(ctx, "INSERT INTO "+d+" ("+cols+") SELECT "+cols+" FROM "+stage+" WHERE "+present)
		if err != nil {
			return 0, fmt.Errorf("apply: %w", err)
		}
		return tag.RowsAffected(), nil
	}
	stageDel, err := createDeletionStage(ctx, tx, st)
	if err != nil {
		return 0, err
	}
	if _, err := tx.Conn().PgConn().CopyFrom(ctx, deleted, copyDeletionsIn(st, stageDel)); err != nil {
		return 0, fmt.Errorf("copy deleted rows: %w", err)
	}
	return applyLogdel(ctx, tx, cfg, st, dest, stage, stageDel, false)
}

// deletionsSQL is the COPY that brings, for each key, the last deletion in
// the source queue among the entries that pass filter (a condition
// followed by AND, or ""). The queue keeps a deleted row as jsonb; it is
// read back as a row of the source table as it is now (a column added
// since is NULL, one dropped is left out).
func deletionsSQL(cfg *queueConfig, st *sourceTable, filter string) string {
	deletedAt := ident.Quote(triggers.ColDeletedAt)
	keys := prefixNames("q.", cfg.PkField)
	return "COPY (SELECT DISTINCT ON (" + keys + ") " + prefixNames("r.", columnNames(st.Columns)) + ", q." + deletedAt +
		" FROM " + cfg.Names.Queue.Sanitize() + " q CROSS JOIN LATERAL jsonb_populate_record(NULL::" + st.Name.Sanitize() +
		", q." + ident.Quote(triggers.ColRow) + ") r WHERE " + filter + "q." + deletedAt +
		" IS NOT NULL ORDER BY " + keys + ", q." + deletedAt + " DESC) TO STDOUT (FORMAT binary)"
}

// createDeletionStage creates the staging table deletionsSQL's rows go to
// and returns its name.
func createDeletionStage(ctx context.Context, tx pgx.Tx, st *sourceTable) (string, error) {
	stageDel := ident.Quote("mimeo_stage_deleted")
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+stageDel+" ("+columnDefs(unconstrained(st.Columns))+", "+
		ident.Quote(triggers.ColDeletedAt)+" timestamptz) ON COMMIT DROP"); err != nil {
		return "", fmt.Errorf("create staging table: %w", err)
	}
	return stageDel, nil
}

// copyDeletionsIn is the COPY that loads deletionsSQL's rows into stageDel.
func copyDeletionsIn(st *sourceTable, stageDel string) string {
	return "COPY " + stageDel + " (" + columnList(st.Columns) + ", " + ident.Quote(triggers.ColDeletedAt) + ") FROM STDIN (FORMAT binary, FREEZE)"
}

// stageDeletions copies the last deletion of each key in the source queue
// (see deletionsSQL) into a staging table and returns its name.
func stageDeletions(ctx context.Context, tx pgx.Tx, src *pgconn.PgConn, cfg *queueConfig, st *sourceTable, filter string) (string, error) {
	stageDel, err := createDeletionStage(ctx, tx, st)
	if err != nil {
		return "", err
	}
	if _, err := copyRows(ctx, src, deletionsSQL(cfg, st, filter), tx.Conn().PgConn(), copyDeletionsIn(st, stageDel)); err != nil {
		return "", fmt.Errorf("copy deleted rows: %w", err)
	}
	return stageDel, nil
}

// prefixNames quotes names and puts a table alias before each.
func prefixNames(alias string, names []string) string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = alias + ident.Quote(n)
	}
	return strings.Join(out, ", ")
}

// applyLogdel applies a logdel batch from its staging tables (stage: every
// key in play, with its live row where presentColumn is true; stageDel: the
// last deletion of keys): live rows replace their keys; a key no longer
// live on the source is kept with its last values and the time of its
// deletion. everyLive is a repull, where every live destination row is in
// play.
func applyLogdel(ctx context.Context, tx pgx.Tx, cfg *queueConfig, st *sourceTable, dest ident.Name, stage, stageDel string, everyLive bool) (int64, error) {
	d := dest.Sanitize()
	cols := columnList(st.Columns)
	deletedAt := ident.Quote(triggers.ColDeletedAt)
	marked := ident.Quote(deletedColumn)
	present := ident.Quote(presentColumn)
	keys := quoteNames(cfg.PkField)
	// One delete for all the batch's keys: a key with a live source row or
	// a new deletion loses whatever the destination has; any other key in
	// play loses only its live row (an old key, or one that left the
	// condition).
	inPlay := "(SELECT " + keys + ", " + present + " AS whole FROM " + stage + " WHERE " + present + " OR " + ident.Quote(existsColumn) +
		" UNION ALL SELECT " + keys + ", true FROM " + stageDel + ")"
	gone := "DELETE FROM " + d + " d USING " + inPlay + " k WHERE " + keyMatch(cfg.PkField, "d", "k") +
		" AND (k.whole OR d." + marked + " IS NULL)"
	against := sqlKeyedJoins
	if everyLive {
		against = sqlAnyJoins
		gone = "DELETE FROM " + d + " d WHERE d." + marked + " IS NULL OR EXISTS (SELECT 1 FROM " + inPlay + " k WHERE " +
			keyMatch(cfg.PkField, "d", "k") + " AND k.whole)"
	}
	steps := []string{
		// Between the two staging tables, hashing is right.
		sqlAnyJoins,
		// Live on the source again: not deleted.
		"DELETE FROM " + stageDel + " x USING " + stage + " r WHERE " + keyMatch(cfg.PkField, "x", "r") + " AND r." + present,
		// Against the destination, its key index is (but for a repull,
		// where every row is in play).
		against,
		// A deletion older than the one already recorded changes nothing.
		"DELETE FROM " + stageDel + " x USING " + d + " d WHERE " + keyMatch(cfg.PkField, "x", "d") +
			" AND d." + marked + " >= x." + deletedAt,
	}
	if cfg.Condition != "" {
		// A row outside the condition was never here: its deletion is not
		// history of this table.
		steps = append(steps, "DELETE FROM "+stageDel+" x WHERE NOT EXISTS (SELECT 1 FROM "+d+" d WHERE "+keyMatch(cfg.PkField, "d", "x")+")")
	}
	steps = append(steps, gone, sqlAnyJoins)
	if err := execAll(ctx, tx, "apply", steps); err != nil {
		return 0, err
	}
	live, err := tx.Exec(ctx, "INSERT INTO "+d+" ("+cols+") SELECT "+cols+" FROM "+stage+" WHERE "+present)
	if err != nil {
		return 0, fmt.Errorf("apply: %w", err)
	}
	dead, err := tx.Exec(ctx, "INSERT INTO "+d+" ("+cols+", "+marked+") SELECT "+cols+", "+deletedAt+" FROM "+stageDel)
	if err != nil {
		return 0, fmt.Errorf("apply: %w", err)
	}
	return live.RowsAffected() + dead.RowsAffected(), nil
}

// repullQueued reloads the table at one snapshot of the source, then
// removes exactly the queue entries that snapshot already contains; later
// entries stay for the next replay. A failure anywhere loses no change.
// logdel keeps its deletion history, and adds the deletions still queued.
func (a *Agent) repullQueued(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, diff columnDiff) error {
	snap, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadWrite})
	if err != nil {
		return fmt.Errorf("repull %s: %w", r.dest, err)
	}
	defer func() { _ = snap.Rollback(context.WithoutCancel(ctx)) }()
	q := cfg.Names.Queue.Sanitize()
	// The first statement fixes the snapshot for the copy and the delete.
	if _, err := snap.Exec(ctx, "SELECT 1 FROM "+q+" LIMIT 1"); err != nil {
		return fmt.Errorf("repull %s: %w", r.dest, err)
	}
	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		d := r.dest.Sanitize()
		cols := columnList(st.Columns)
		if cfg.Type == "dml" {
			// A table handed to another role, with DML grants, is emptied
			// with DELETE.
			deleted, err := emptyTable(ctx, tx, r.dest)
			if err != nil {
				return err
			}
			if !deleted {
				if _, err := tx.Exec(ctx, "TRUNCATE "+d); err != nil {
					return err
				}
			}
		}
		if !diff.none() {
			// logdel keeps its deleted rows: their values are cast.
			if err := r.rebuildColumns(ctx, tx, diff, st, cfg.Type == "dml", cfg.Indexes, cfg.PostScript); err != nil {
				return err
			}
		}
		if err := recordColumns(ctx, tx, cfg.Type, r.req.DestTable, st); err != nil {
			return err
		}
		keyTypes := make([]string, len(cfg.PkField))
		for i, k := range cfg.PkField {
			keyTypes[i] = st.Columns[indexOfColumn(st.Columns, k)].Type
		}
		if _, err := tx.Exec(ctx, "UPDATE "+typeConfigTable(cfg.Type)+" SET pk_type = $2 WHERE dest_table = $1", r.req.DestTable, keyTypes); err != nil {
			return fmt.Errorf("record key types: %w", err)
		}
		target := r.dest
		if cfg.Type == "logdel" {
			target = ident.Name{Schema: "pg_temp", Table: "mimeo_stage_rows"}
			if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+ident.Quote("mimeo_stage_rows")+" ("+columnDefs(st.Columns)+", "+
				ident.Quote(presentColumn)+" boolean NOT NULL DEFAULT true, "+ident.Quote(existsColumn)+" boolean NOT NULL DEFAULT true) ON COMMIT DROP"); err != nil {
				return err
			}
		}
		rows, err := copyRows(ctx, snap.Conn().PgConn(), copyOutSQL(st, cfg.Condition), tx.Conn().PgConn(),
			"COPY "+target.Sanitize()+" ("+cols+") FROM STDIN (FORMAT binary)")
		if err != nil {
			return err
		}
		if cfg.Type == "logdel" {
			// Deletions still queued become history too; then every live key
			// of the destination is reloaded.
			stageDel, err := stageDeletions(ctx, tx, snap.Conn().PgConn(), cfg, st, "")
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "ANALYZE "+target.Sanitize()+"; ANALYZE "+stageDel); err != nil {
				return err
			}
			if _, err := applyLogdel(ctx, tx, cfg, st, r.dest, target.Sanitize(), stageDel, true); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
			return err
		}
		if err := markChecksRepaired(ctx, tx, r); err != nil {
			return err
		}
		msg := fmt.Sprintf("re-pulled %d rows", rows)
		r.note(ctx, "Repull", msg, false)
		if err := a.fault(faultRepullBeforeCommit); err != nil {
			return err
		}
		return r.complete(ctx, tx, rows, msg)
	})
	if err != nil {
		return fmt.Errorf("repull %s: %w", r.dest, err)
	}
	// The entries this snapshot sees are in the reload; newer ones stay.
	if _, err := snap.Exec(ctx, "DELETE FROM "+q); err != nil {
		r.log.Warn("cannot remove queue entries covered by the repull; they will be replayed", "error", err)
		return nil
	}
	if err := snap.Commit(ctx); err != nil {
		r.log.Warn("cannot remove queue entries covered by the repull; they will be replayed", "error", err)
	}
	return nil
}

// retypeQueueKeys gives the queue's key columns the types the source's
// key columns call for now (a key retyped beyond its kind: integer to
// uuid, say). Entries whose keys cannot be converted are dropped: the
// repull that follows, in a later snapshot, covers them.
func retypeQueueKeys(ctx context.Context, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable) error {
	rows, err := src.Query(ctx, `SELECT attname, format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute
WHERE attrelid = $1::regclass AND attname = ANY($2) AND NOT attisdropped`, cfg.Names.Queue.Sanitize(), cfg.PkField)
	if err != nil {
		return fmt.Errorf("read the queue's key columns: %w", err)
	}
	have, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (column, error) {
		var c column
		err := row.Scan(&c.Name, &c.Type)
		return c, err
	})
	if err != nil {
		return fmt.Errorf("read the queue's key columns: %w", err)
	}
	q := cfg.Names.Queue.Sanitize()
	for _, h := range have {
		want := triggers.QueueType(st.Columns[indexOfColumn(st.Columns, h.Name)].Type)
		if want == triggers.QueueType(h.Type) {
			continue
		}
		k := ident.Quote(h.Name)
		err := execSource(ctx, src, []string{sqlDDLLockTimeout,
			"ALTER TABLE " + q + " ALTER COLUMN " + k + " TYPE " + want + " USING " + k + "::text::" + want})
		if err != nil {
			err = execSource(ctx, src, []string{sqlDDLLockTimeout, "DELETE FROM " + q,
				"ALTER TABLE " + q + " ALTER COLUMN " + k + " TYPE " + want + " USING NULL::" + want})
		}
		if err != nil {
			return fmt.Errorf("retype key column %s of queue %s to %s: %w", k, q, want, lockHint(err))
		}
	}
	return nil
}

// execSourceArgs runs one statement in a read-write source transaction.
func execSourceArgs(ctx context.Context, src *pgxpool.Conn, sql string, args ...any) error {
	tx, err := beginWrite(ctx, src)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, sql, args...); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// plural is "1 batch" or "3 batches".
func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return strconv.Itoa(n) + " " + many
}
