package agent

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/triggers"
)

// queueMakerArgs are the arguments of dml_maker / logdel_maker.
type queueMakerArgs struct {
	makerArgs
	PkField []string `json:"pk_field"`
	PkType  []string `json:"pk_type"`
}

// Fault points a test can stop a run at (Config.FaultHook).
const (
	faultAfterDestCommit    = "after destination commit"
	faultRepullBeforeCommit = "repull before destination commit"
)

// makeQueued sets up dml or logdel replication. The triggers and the
// initial copy meet at one consistent point: one source session creates the
// triggers (their locks wait for writers in flight) and exports a snapshot
// taken after that; a second session copies the table in that snapshot.
// Writes before it are in the copy, writes after it wait for the triggers
// and are queued: none is lost, none applied twice.
func (a *Agent) makeQueued(ctx context.Context, r *run, typ string) error {
	var args queueMakerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("%s_maker %s: %w", typ, r.dest, err) }
	srcName, err := ident.Parse(args.SrcTable)
	if err != nil {
		return fail(fmt.Errorf("source table: %w", err))
	}
	ddl, desc, err := a.sources.acquire(ctx, r.dst, args.Dblink)
	if err != nil {
		return fail(err)
	}
	defer ddl.Release()
	r.note(ctx, "Connect to source", "connected to source "+desc, false)
	st, err := describeSource(ctx, ddl, srcName, args.Filter, args.Condition, true)
	if err != nil {
		return fail(err)
	}
	keys, keyTypes, err := updaterKey(st, args.PkField, args.PkType)
	if err != nil {
		return fail(err)
	}
	if err := checkSourceSide(ctx, ddl, srcName); err != nil {
		return fail(err)
	}
	var instance string
	if err := r.dst.QueryRow(ctx, `SELECT id FROM mimeo.instance`).Scan(&instance); err != nil {
		return fail(fmt.Errorf("read mimeo.instance: %w", err))
	}
	spec := triggers.Spec{Source: srcName, Logdel: typ == "logdel", Tag: triggers.Tag(instance, r.req.DestTable)}
	for i, k := range keys {
		spec.Keys = append(spec.Keys, triggers.Column{Name: k, Type: keyTypeOf(st, k, keyTypes[i])})
	}
	for _, c := range st.Columns {
		spec.Columns = append(spec.Columns, triggers.Column{Name: c.Name, Type: c.Type})
	}
	if err := spec.Validate(); err != nil {
		return fail(err)
	}
	if typ == "logdel" && containsColumn(st.Columns, deletedColumn) {
		return fail(fmt.Errorf("source column %q clashes with the column logdel adds; leave it out with p_filter", deletedColumn))
	}
	names := spec.Names()

	// Session one: the triggers, then the snapshot.
	trig, err := beginWrite(ctx, ddl)
	if err != nil {
		return fail(err)
	}
	defer func() { _ = trig.Rollback(context.WithoutCancel(ctx)) }()
	// A maker retried after a crash finds its own leftovers: replace them.
	if err := execAll(ctx, trig, "create source objects", append(names.Drop(), spec.Create()...)); err != nil {
		return fail(err)
	}
	var snapshot string
	if err := trig.QueryRow(ctx, `SELECT pg_export_snapshot()`).Scan(&snapshot); err != nil {
		return fail(fmt.Errorf("export snapshot: %w", err))
	}
	// Session two: the copy, in that snapshot.
	cp, _, err := a.sources.acquire(ctx, r.dst, args.Dblink)
	if err != nil {
		return fail(err)
	}
	defer cp.Release()
	snap, err := cp.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return fail(err)
	}
	defer func() { _ = snap.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := snap.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snapshot)); err != nil {
		return fail(fmt.Errorf("import snapshot: %w", err))
	}
	if err := trig.Commit(ctx); err != nil {
		return fail(fmt.Errorf("commit source objects: %w", err))
	}
	r.note(ctx, "Create source objects", fmt.Sprintf("queue %s, function %s, triggers %s",
		names.Queue, names.Function, strings.Join(names.Triggers(), ", ")), false)

	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if err := checkNewDestination(ctx, tx, r.dest); err != nil {
			return err
		}
		rows, err := r.load(ctx, tx, loadSpec{src: cp, table: st, condition: args.Condition, target: r.dest,
			create: true, pull: args.pull(), indexes: args.indexes()})
		if err != nil {
			return err
		}
		if typ == "logdel" {
			if _, err := tx.Exec(ctx, "ALTER TABLE "+r.dest.Sanitize()+" ADD COLUMN "+ident.Quote(deletedColumn)+" timestamptz"); err != nil {
				return fmt.Errorf("add %s: %w", deletedColumn, err)
			}
		}
		if err := ensureKeyIndex(ctx, tx, r.dest, keys); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+queueConfigTable(typ)+`
    (dest_table, type, dblink, source_table, filter, condition, create_indexes, last_run,
     pk_field, pk_type, queue_table, trigger_function, triggers)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`,
			r.req.DestTable, typ, args.Dblink, args.SrcTable, nullIfEmpty(args.Filter), nullString(args.Condition),
			args.indexes(), lastRun(args.pull(), r), keys, keyTypes, names.Queue.String(), names.Function.String(),
			names.Triggers()); err != nil {
			return fmt.Errorf("record config: %w", err)
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("created %s and the source's queue %s; copied %d rows", r.dest, names.Queue, rows))
	})
	if err != nil {
		// Leave nothing half-created on the source either.
		if derr := execSource(context.WithoutCancel(ctx), ddl, names.Drop()); derr != nil {
			r.log.Warn("cannot remove the source objects of a failed maker", "error", derr)
		}
		return fail(err)
	}
	return nil
}

// refreshQueued replays the queue in batches until it is empty, or, with
// p_repull, reloads the table at a point consistent with the queue.
func (a *Agent) refreshQueued(ctx context.Context, r *run, typ string) error {
	var args incRefreshArgs
	if err := r.args(&args); err != nil {
		return err
	}
	cfg, err := loadQueueConfig(ctx, r.dst, typ, r.req.DestTable)
	if err != nil {
		return err
	}
	srcName, err := ident.Parse(cfg.Source)
	if err != nil {
		return fmt.Errorf("refresh %s: source table: %w", r.dest, err)
	}
	src, desc, err := a.sources.acquire(ctx, r.dst, cfg.Dblink)
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	defer src.Release()
	r.note(ctx, "Connect to source", "connected to source "+desc, false)
	st, err := describeSource(ctx, src, srcName, cfg.Filter, cfg.Condition, false)
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	var queueExists bool
	if err := src.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, cfg.Names.Queue.Sanitize()).Scan(&queueExists); err != nil {
		return fmt.Errorf("refresh %s: look up queue: %w", r.dest, err)
	}
	if !queueExists {
		return fmt.Errorf("refresh %s: the source queue %s is missing: recreate the table with %s_destroyer and %s_maker", r.dest, cfg.Names.Queue, typ, typ)
	}
	if args.Repull {
		return a.repullQueued(ctx, r, src, cfg, st)
	}
	limit := cfg.BatchLimit
	if args.Limit != nil {
		limit = *args.Limit
	}
	var total int64
	batches := 0
	for {
		claimed, err := claimBatch(ctx, src, cfg, limit)
		if err != nil {
			return fmt.Errorf("refresh %s: claim queued changes: %w", r.dest, err)
		}
		if claimed == 0 {
			break
		}
		var rows int64
		err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
			var err error
			rows, err = applyQueued(ctx, tx, src, cfg, st, r.dest)
			return err
		})
		if err != nil {
			return fmt.Errorf("refresh %s: apply batch %d: %w", r.dest, batches+1, err)
		}
		if err := a.fault(faultAfterDestCommit); err != nil {
			return err
		}
		// Only now, with the destination committed, may the entries go.
		if err := execSource(ctx, src, []string{"DELETE FROM " + cfg.Names.Queue.Sanitize() + " WHERE " + ident.Quote(triggers.ColClaimed)}); err != nil {
			return fmt.Errorf("refresh %s: remove applied queue entries: %w", r.dest, err)
		}
		total += rows
		batches++
		if r.debug {
			r.note(ctx, "Batch", fmt.Sprintf("batch %d: %d queued changes, %d rows", batches, claimed, rows), false)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "UPDATE "+queueConfigTable(typ)+" SET last_run = $2 WHERE dest_table = $1", r.req.DestTable, r.started); err != nil {
			return fmt.Errorf("record run: %w", err)
		}
		msg := fmt.Sprintf("replayed %d batches; %d rows written", batches, total)
		r.note(ctx, "Summary", msg, false)
		return r.complete(ctx, tx, total, msg)
	})
}

// claimBatch marks up to limit queue entries as claimed, unless entries
// claimed by an earlier, interrupted run are still there (they go first),
// and returns how many are claimed.
func claimBatch(ctx context.Context, src *pgxpool.Conn, cfg *queueConfig, limit int) (int64, error) {
	q := cfg.Names.Queue.Sanitize()
	claimed := ident.Quote(triggers.ColClaimed)
	tx, err := beginWrite(ctx, src)
	if err != nil {
		return 0, err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	var n int64
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM "+q+" WHERE "+claimed).Scan(&n); err != nil {
		return 0, err
	}
	if n == 0 {
		// The queue has no key of its own: entries are claimed by row
		// address, in no particular order (replay order does not matter,
		// the source's current rows are what gets applied).
		tag, err := tx.Exec(ctx, "UPDATE "+q+" SET "+claimed+" = true WHERE ctid = ANY(ARRAY(SELECT ctid FROM "+q+
			" WHERE NOT "+claimed+" LIMIT $1))", limit)
		if err != nil {
			return 0, err
		}
		n = tag.RowsAffected()
	}
	return n, tx.Commit(ctx)
}

// applyQueued applies the claimed entries inside the destination's tx:
// delete their keys, insert the source's current rows for them (logdel:
// and the last values of rows deleted on the source, marked deleted).
func applyQueued(ctx context.Context, tx pgx.Tx, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, dest ident.Name) (int64, error) {
	q := cfg.Names.Queue.Sanitize()
	claimed := ident.Quote(triggers.ColClaimed)
	keys := quoteNames(cfg.PkField)
	cols := columnList(st.Columns)
	stageKeys, stageRows := ident.Quote("mimeo_stage_keys"), ident.Quote("mimeo_stage_rows")
	keyDefs := make([]column, len(cfg.PkField))
	for i, k := range cfg.PkField {
		keyDefs[i] = st.Columns[indexOfColumn(st.Columns, k)]
		keyDefs[i].NotNull = false
	}
	for _, stmt := range []string{
		"CREATE TEMP TABLE " + stageKeys + " (" + columnDefs(keyDefs) + ") ON COMMIT DROP",
		"CREATE TEMP TABLE " + stageRows + " (" + columnDefs(st.Columns) + ") ON COMMIT DROP",
	} {
		if _, err := tx.Exec(ctx, stmt); err != nil {
			return 0, fmt.Errorf("create staging table: %w", err)
		}
	}
	// The claimed keys, then the source's rows for them, now.
	if _, err := copyRows(ctx, src.Conn().PgConn(),
		"COPY (SELECT DISTINCT "+keys+" FROM "+q+" WHERE "+claimed+") TO STDOUT (FORMAT binary)",
		tx.Conn().PgConn(), "COPY "+stageKeys+" ("+keys+") FROM STDIN (FORMAT binary, FREEZE)"); err != nil {
		return 0, fmt.Errorf("copy queued keys: %w", err)
	}
	where := "WHERE (" + keysOf("t", cfg.PkField) + ") IN (SELECT " + keys + " FROM " + q + " WHERE " + claimed + ")"
	if cfg.Condition != "" {
		where += " AND " + whereClause(cfg.Condition)[len("WHERE "):]
	}
	rows, err := copyRows(ctx, src.Conn().PgConn(),
		"COPY (SELECT "+prefixed("t", st.Columns)+" FROM "+st.Name.Sanitize()+" t "+where+") TO STDOUT (FORMAT binary)",
		tx.Conn().PgConn(), "COPY "+stageRows+" ("+cols+") FROM STDIN (FORMAT binary, FREEZE)")
	if err != nil {
		return 0, fmt.Errorf("copy current rows: %w", err)
	}
	if _, err := tx.Exec(ctx, "ANALYZE "+stageKeys+"; ANALYZE "+stageRows); err != nil {
		return 0, fmt.Errorf("analyze staging tables: %w", err)
	}
	if cfg.Type == "dml" {
		for _, stmt := range []string{
			"DELETE FROM " + dest.Sanitize() + " d USING " + stageKeys + " k WHERE " + keyMatch(cfg.PkField, "d", "k"),
			"INSERT INTO " + dest.Sanitize() + " (" + cols + ") SELECT " + cols + " FROM " + stageRows,
		} {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return 0, fmt.Errorf("apply: %w", err)
			}
		}
		return rows, nil
	}
	return applyLogdel(ctx, tx, src, cfg, st, dest, rows)
}

// applyLogdel finishes a logdel batch: a key gone from the source is kept
// with its last values and the time of its deletion; a key deleted and
// inserted again is simply live.
func applyLogdel(ctx context.Context, tx pgx.Tx, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, dest ident.Name, rows int64) (int64, error) {
	q := cfg.Names.Queue.Sanitize()
	claimed, deletedAt := ident.Quote(triggers.ColClaimed), ident.Quote(triggers.ColDeletedAt)
	keys := quoteNames(cfg.PkField)
	cols := columnList(st.Columns)
	stageDel, stageRows := ident.Quote("mimeo_stage_deleted"), ident.Quote("mimeo_stage_rows")
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+stageDel+" ("+columnDefs(unconstrained(st.Columns))+", "+deletedAt+" timestamptz) ON COMMIT DROP"); err != nil {
		return 0, fmt.Errorf("create staging table: %w", err)
	}
	// The last deletion queued for each key.
	if _, err := copyRows(ctx, src.Conn().PgConn(),
		"COPY (SELECT DISTINCT ON ("+keys+") "+cols+", "+deletedAt+" FROM "+q+" WHERE "+claimed+" AND "+deletedAt+
			" IS NOT NULL ORDER BY "+keys+", "+deletedAt+" DESC) TO STDOUT (FORMAT binary)",
		tx.Conn().PgConn(), "COPY "+stageDel+" ("+cols+", "+deletedAt+") FROM STDIN (FORMAT binary, FREEZE)"); err != nil {
		return 0, fmt.Errorf("copy deleted rows: %w", err)
	}
	d := dest.Sanitize()
	deleted := 0
	for _, stmt := range []string{
		// Live on the source again: not deleted.
		"DELETE FROM " + stageDel + " x USING " + stageRows + " r WHERE " + keyMatch(cfg.PkField, "x", "r"),
		// Keys neither live nor deleted in this batch keep their row until
		// their own deletion comes along.
		"DELETE FROM " + d + " d USING " + stageRows + " r WHERE " + keyMatch(cfg.PkField, "d", "r"),
		"DELETE FROM " + d + " d USING " + stageDel + " x WHERE " + keyMatch(cfg.PkField, "d", "x"),
		"INSERT INTO " + d + " (" + cols + ") SELECT " + cols + " FROM " + stageRows,
		"INSERT INTO " + d + " (" + cols + ", " + ident.Quote(deletedColumn) + ") SELECT " + cols + ", " + deletedAt + " FROM " + stageDel,
	} {
		tag, err := tx.Exec(ctx, stmt)
		if err != nil {
			return 0, fmt.Errorf("apply: %w", err)
		}
		deleted = int(tag.RowsAffected())
	}
	return rows + int64(deleted), nil
}

// repullQueued truncates and reloads at one snapshot of the source, then
// removes exactly the queue entries that snapshot already contains; later
// entries stay for the next replay. A failure anywhere loses no change.
func (a *Agent) repullQueued(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable) error {
	snap, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadWrite})
	if err != nil {
		return fmt.Errorf("repull %s: %w", r.dest, err)
	}
	defer func() { _ = snap.Rollback(context.WithoutCancel(ctx)) }()
	// The first statement fixes the snapshot for the copy and the delete.
	if _, err := snap.Exec(ctx, "SELECT 1 FROM "+cfg.Names.Queue.Sanitize()+" LIMIT 1"); err != nil {
		return fmt.Errorf("repull %s: %w", r.dest, err)
	}
	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		d := r.dest.Sanitize()
		cols := columnList(st.Columns)
		target := r.dest
		if cfg.Type == "logdel" {
			// Deleted rows are history the source no longer has: keep them,
			// unless their key is live again.
			if _, err := tx.Exec(ctx, "DELETE FROM "+d+" WHERE "+ident.Quote(deletedColumn)+" IS NULL"); err != nil {
				return err
			}
			target = ident.Name{Schema: "pg_temp", Table: "mimeo_stage_rows"}
			if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+ident.Quote("mimeo_stage_rows")+" ("+columnDefs(st.Columns)+") ON COMMIT DROP"); err != nil {
				return err
			}
		} else if _, err := tx.Exec(ctx, "TRUNCATE "+d); err != nil {
			return err
		}
		rows, err := copyRows(ctx, snap.Conn().PgConn(), copyOutSQL(st, cfg.Condition), tx.Conn().PgConn(),
			"COPY "+target.Sanitize()+" ("+cols+") FROM STDIN (FORMAT binary)")
		if err != nil {
			return err
		}
		if cfg.Type == "logdel" {
			stage := target.Sanitize()
			for _, stmt := range []string{
				"DELETE FROM " + d + " d USING " + stage + " r WHERE " + keyMatch(cfg.PkField, "d", "r"),
				"INSERT INTO " + d + " (" + cols + ") SELECT " + cols + " FROM " + stage,
			} {
				if _, err := tx.Exec(ctx, stmt); err != nil {
					return err
				}
			}
		}
		if _, err := tx.Exec(ctx, "UPDATE "+queueConfigTable(cfg.Type)+" SET last_run = $2 WHERE dest_table = $1", r.req.DestTable, r.started); err != nil {
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
	// The entries this snapshot sees are in the copy; newer ones stay.
	if _, err := snap.Exec(ctx, "DELETE FROM "+cfg.Names.Queue.Sanitize()); err != nil {
		r.log.Warn("cannot remove queue entries covered by the repull; they will be replayed", "error", err)
		return nil
	}
	if err := snap.Commit(ctx); err != nil {
		r.log.Warn("cannot remove queue entries covered by the repull; they will be replayed", "error", err)
	}
	return nil
}

// destroyQueued removes the source objects this table's config names, then
// the config and (unless ARCHIVE) the destination table.
func (a *Agent) destroyQueued(ctx context.Context, r *run, typ string) error {
	cfg, err := loadQueueConfig(ctx, r.dst, typ, r.req.DestTable)
	if err != nil {
		return err
	}
	src, _, err := a.sources.acquire(ctx, r.dst, cfg.Dblink)
	if err != nil {
		return fmt.Errorf("%s_destroyer %s: %w (the source objects must be removed first; fix the connection and retry)", typ, r.dest, err)
	}
	defer src.Release()
	if err := execSource(ctx, src, cfg.Names.Drop()); err != nil {
		return fmt.Errorf("%s_destroyer %s: remove source objects: %w", typ, r.dest, err)
	}
	r.note(ctx, "Remove source objects", "removed "+cfg.Names.Queue.String()+", "+cfg.Names.Function.String()+" and the triggers", false)
	return a.destroyTable(ctx, r)
}

// fault lets a test stop a run at a named point (Config.FaultHook).
func (a *Agent) fault(point string) error {
	if a.cfg.FaultHook == nil {
		return nil
	}
	return a.cfg.FaultHook(point)
}

func keyTypeOf(st *sourceTable, name, given string) string {
	if i := indexOfColumn(st.Columns, name); i >= 0 {
		return st.Columns[i].Type
	}
	return given
}

func indexOfColumn(cols []column, name string) int {
	for i, c := range cols {
		if c.Name == name {
			return i
		}
	}
	return -1
}

func containsColumn(cols []column, name string) bool { return indexOfColumn(cols, name) >= 0 }

// keysOf is "t.k1, t.k2".
func keysOf(alias string, keys []string) string {
	out := ""
	for i, k := range keys {
		if i > 0 {
			out += ", "
		}
		out += alias + "." + ident.Quote(k)
	}
	return out
}

// prefixed is "t.c1, t.c2" for the columns.
func prefixed(alias string, cols []column) string {
	out := ""
	for i, c := range cols {
		if i > 0 {
			out += ", "
		}
		out += alias + "." + ident.Quote(c.Name)
	}
	return out
}

// unconstrained drops NOT NULL (staging tables hold what the queue holds).
func unconstrained(cols []column) []column {
	out := make([]column, len(cols))
	for i, c := range cols {
		c.NotNull = false
		out[i] = c
	}
	return out
}

// quoteLiteral quotes a value PostgreSQL produced (a snapshot id) for a
// statement that takes no parameters.
func quoteLiteral(s string) string {
	out := "'"
	for _, r := range s {
		if r == '\'' {
			out += "''"
		} else {
			out += string(r)
		}
	}
	return out + "'"
}
