package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/queue"
)

// Incremental replication (inserter, updater): rows whose control column
// passed last_value, up to an upper bound that keeps clear of rows still
// being written, in batches that each commit together with the new
// last_value. A batch ends on a control value and takes every row with that
// value (a tie is never split, even when it is larger than the batch), so
// the next batch starts strictly after it: nothing is missed or doubled.

// incConfig is a row of mimeo.refresh_config_inserter or _updater.
type incConfig struct {
	Type       string // "inserter" or "updater"
	Source     string
	Dblink     int
	Filter     []string
	Condition  string
	BatchLimit int
	Indexes    bool
	Control    string
	Kind       controlKind
	Boundary   string
	LastValue  *string
	DstActive  bool
	DstStart   int
	DstEnd     int
	PkField    []string
	Columns    []string // the source columns the destination was built with (nil: its own)
	PostScript []string
}

const sqlIncConfig = `
SELECT source_table, dblink, filter, coalesce(condition, ''), batch_limit, create_indexes,
       control, control_type, boundary, last_value, dst_active, dst_start, dst_end, columns, post_script, %s
FROM %s WHERE dest_table = $1`

func loadIncConfig(ctx context.Context, q queue.DB, typ, dest string) (*incConfig, error) {
	c := &incConfig{Type: typ}
	pk := "NULL::text[]"
	if typ == "updater" {
		pk = "pk_field"
	}
	var kind string
	err := q.QueryRow(ctx, fmt.Sprintf(sqlIncConfig, pk, typeConfigTable(typ)), dest).Scan(
		&c.Source, &c.Dblink, &c.Filter, &c.Condition, &c.BatchLimit, &c.Indexes,
		&c.Control, &kind, &c.Boundary, &c.LastValue, &c.DstActive, &c.DstStart, &c.DstEnd, &c.Columns, &c.PostScript, &c.PkField)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%s: %w as %s", dest, ErrNotConfigured, typ)
	}
	if err != nil {
		return nil, fmt.Errorf("read config of %s: %w", dest, err)
	}
	c.Kind = controlKind(kind)
	return c, nil
}

// incRefreshArgs are the arguments of refresh_inserter / refresh_updater.
type incRefreshArgs struct {
	Limit       *int    `json:"limit"`
	Repull      bool    `json:"repull"`
	RepullStart *string `json:"repull_start"`
	RepullEnd   *string `json:"repull_end"`
}

// refreshIncremental catches a table up, or re-pulls it (all of it, or an
// exclusive range of control values).
func (a *Agent) refreshIncremental(ctx context.Context, r *run, typ string) error {
	var args incRefreshArgs
	if err := r.args(&args); err != nil {
		return err
	}
	cfg, err := loadIncConfig(ctx, r.dst, typ, r.req.DestTable)
	if err != nil {
		return err
	}
	src, st, diff, err := a.openIncSource(ctx, r, cfg, args.Repull)
	if err != nil {
		return err
	}
	defer src.Release()
	rebuild := args.Repull && args.RepullStart == nil && args.RepullEnd == nil
	if !diff.none() && !rebuild {
		return fmt.Errorf("refresh %s: %w", r.dest, columnsChangedError(st, diff, typ, r.req.DestTable))
	}

	if cfg.DstActive {
		paused, msg, err := a.dstPause(ctx, src, cfg)
		if err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		if paused {
			r.skip(ctx, msg)
			return nil
		}
	}
	limit := cfg.BatchLimit
	if args.Limit != nil {
		limit = *args.Limit
	}
	switch {
	case args.Repull && (args.RepullStart != nil || args.RepullEnd != nil):
		return a.repullRange(ctx, r, src, cfg, st, args.RepullStart, args.RepullEnd)
	case args.Repull:
		err := withTx(ctx, r.dst, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "TRUNCATE "+r.dest.Sanitize()); err != nil {
				return fmt.Errorf("truncate %s: %w", r.dest, err)
			}
			if !diff.none() {
				if err := r.rebuildColumns(ctx, tx, diff, st, true, cfg.Indexes, cfg.PostScript); err != nil {
					return err
				}
			}
			if err := recordColumns(ctx, tx, typ, r.req.DestTable, st); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "UPDATE "+typeConfigTable(typ)+" SET last_value = NULL WHERE dest_table = $1", r.req.DestTable)
			return err
		})
		if err != nil {
			return fmt.Errorf("repull %s: %w", r.dest, err)
		}
		r.note(ctx, "Repull", "truncated "+r.dest.String()+"; reloading everything in batches", false)
		cfg.LastValue = nil
	}
	return a.catchUp(ctx, r, src, cfg, st, limit)
}

// openIncSource connects to the source and checks that its table still
// fits the config: control column of the same kind and key columns
// present; it returns how the other columns changed (withIndexes: read the
// source's indexes too, for a rebuild).
func (a *Agent) openIncSource(ctx context.Context, r *run, cfg *incConfig, withIndexes bool) (*pgxpool.Conn, *sourceTable, columnDiff, error) {
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: cfg.Dblink, Table: cfg.Source, Filter: cfg.Filter,
		Condition: cfg.Condition, Indexes: withIndexes && cfg.Indexes})
	if err != nil {
		return nil, nil, columnDiff{}, fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	diff, err := checkIncColumns(ctx, r.dst, r.dest, st, cfg)
	if err != nil {
		src.Release()
		return nil, nil, columnDiff{}, fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	return src, st, diff, nil
}

// checkIncColumns checks the control and key columns, which no rebuild
// can change, and compares the others with those the destination was
// built with.
func checkIncColumns(ctx context.Context, dst queue.DB, dest ident.Name, st *sourceTable, cfg *incConfig) (columnDiff, error) {
	kind, err := controlColumn(st, cfg.Control)
	if err != nil {
		return columnDiff{}, err
	}
	if kind != cfg.Kind {
		return columnDiff{}, fmt.Errorf("control column %q is now %s, was %s: recreate the table with the destroyer and maker", cfg.Control, kind, cfg.Kind)
	}
	if err := checkKeyColumns(cfg.Type, cfg.PkField, st); err != nil {
		return columnDiff{}, err
	}
	return checkColumns(ctx, dst, dest, st, cfg.Columns)
}

// controlColumn finds the control column among the copied columns.
func controlColumn(st *sourceTable, name string) (controlKind, error) {
	i := indexOfColumn(st.Columns, name)
	if i < 0 {
		return "", fmt.Errorf("control column %q is not a column of %s (or p_filter leaves it out)", name, st.Name)
	}
	kind, ok := controlKindOf(st.Columns[i].Type)
	if !ok {
		return "", fmt.Errorf("control column %q has type %s; it must be timestamptz, timestamp or an integer (serial)", name, st.Columns[i].Type)
	}
	return kind, nil
}

// catchUp copies batches until it reaches the run's upper bound.
func (a *Agent) catchUp(ctx context.Context, r *run, src *pgxpool.Conn, cfg *incConfig, st *sourceTable, limit int) error {
	bound, err := a.upperBound(ctx, r, src, cfg, st)
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	var total int64
	batches := 0
	last := cfg.LastValue
	if last != nil {
		// last_value is written into COPY statements: let the source say
		// it in canonical form first (it may have been edited by hand).
		var canon string
		if err := src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`$1::text::`+cfg.Kind.sqlType()), *last).Scan(&canon); err != nil {
			return fmt.Errorf("refresh %s: last_value %q is not a valid %s: %w", r.dest, *last, cfg.Kind.sqlType(), err)
		}
		last = &canon
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pending := make(chan *incBatch, 1)
	produced := make(chan error, 1)
	go func() { produced <- produceInc(pctx, src, cfg, st, deref(last), bound, limit, pending) }()
	for b := range pending {
		var rows int64
		err := withTx(ctx, r.dst, func(tx pgx.Tx) error {
			var err error
			if rows, err = applyRows(ctx, tx, cfg, st, r.dest, b.rows); err != nil {
				return err
			}
			if err := advance(ctx, tx, cfg, r.req.DestTable, b.end); err != nil {
				return err
			}
			if b.final {
				return a.finishInc(ctx, tx, r, cfg, st, total+rows, batches+1, &b.end)
			}
			return nil
		})
		if err != nil {
			if perr := stopProducer(cancel, pending, produced, b); perr != nil {
				err = perr // the destination only failed because the source did
			}
			return fmt.Errorf("refresh %s: batch %d (%s): %w", r.dest, batches+1, describeLast(last), err)
		}
		total += rows
		batches++
		r.committed = total
		last = &b.end
		if r.debug {
			r.note(ctx, "Batch", fmt.Sprintf("batch %d: %d rows up to %s", batches, rows, b.end), false)
		}
		if b.final {
			return <-produced
		}
		if ctx.Err() != nil {
			_ = stopProducer(cancel, pending, produced)
			return ctx.Err() // committed batches stay; the request is resumed
		}
	}
	if err := <-produced; err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	// Caught up.
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		return a.finishInc(ctx, tx, r, cfg, st, total, batches, last)
	})
}

// incBatch is a batch in flight: the control value it ends on, and its
// rows, spooled from the source.
type incBatch struct {
	end   string
	final bool // the last batch before the run's upper bound
	rows  *spool
}

func (b *incBatch) closeRead() { b.rows.closeRead() }

// produceInc is catchUp's source side: it finds each batch's end and
// spools its rows, the next batch while the destination writes this one,
// until the upper bound (none when bound is ""); then it closes batches.
func produceInc(ctx context.Context, src *pgxpool.Conn, cfg *incConfig, st *sourceTable, last, bound string, limit int, batches chan<- *incBatch) error {
	defer close(batches)
	for bound != "" {
		end, final, err := batchEnd(ctx, src, cfg, st, last, bound, limit)
		if err != nil {
			return fmt.Errorf("find batch: %w", err)
		}
		if end == "" {
			return nil
		}
		b := &incBatch{end: end, final: final, rows: newSpool()}
		select {
		case batches <- b:
		case <-ctx.Done():
			return ctx.Err()
		}
		where := window(cfg.Kind, cfg.Control, last, end, "<=", cfg.Condition)
		if err := spoolCopy(ctx, src.Conn().PgConn(), rowsSQL(st, where), b.rows); err != nil {
			return err
		}
		if final {
			return nil
		}
		last = end
	}
	return nil
}

// describeLast says in a clause where a table stands: "last_value is
// <value>", or "nothing copied yet" before its first row.
func describeLast(last *string) string {
	if last == nil {
		return "nothing copied yet"
	}
	return "last_value is " + *last
}

// finishInc records the run's end in its last transaction.
func (a *Agent) finishInc(ctx context.Context, tx pgx.Tx, r *run, cfg *incConfig, st *sourceTable, rows int64, batches int, last *string) error {
	if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
		return fmt.Errorf("record run: %w", err)
	}
	if cfg.Columns == nil { // made before mimeo 0.4.0: record what it was built with
		if err := recordColumns(ctx, tx, cfg.Type, r.req.DestTable, st); err != nil {
			return err
		}
	}
	msg := fmt.Sprintf("copied %s in %s; %s", plural(int(rows), "row", "rows"), plural(batches, "batch", "batches"), describeLast(last))
	if batches == 0 {
		msg = "nothing new on the source; " + describeLast(last)
	}
	r.note(ctx, "Summary", msg, false)
	return r.complete(ctx, tx, rows, msg)
}

// upperBound is the highest control value this run may copy ("" when the
// source has nothing): now() - boundary for time columns, or the start of
// the oldest open source transaction with 'auto'; max - boundary for
// serial ones.
func (a *Agent) upperBound(ctx context.Context, r *run, src *pgxpool.Conn, cfg *incConfig, st *sourceTable) (string, error) {
	var bound *string
	var err error
	switch {
	case cfg.Kind.timed() && cfg.Boundary == "auto":
		if err := checkStatsVisible(ctx, src); err != nil {
			return "", err
		}
		// A prepared transaction's start is unknown (only its PREPARE
		// time is): wait until it is resolved.
		var prepared bool
		if err := src.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE database = current_database())`).Scan(&prepared); err != nil {
			return "", fmt.Errorf("look for prepared transactions: %w", err)
		}
		if prepared {
			r.note(ctx, "Upper bound", "waiting: a prepared transaction on the source may still commit older rows (see pg_prepared_xacts)", true)
			return "", nil
		}
		// A transaction still open may yet commit rows whose control value
		// is as old as its start: nothing at or after that moment is safe.
		err = src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`least(now(),
    (SELECT min(xact_start) FROM pg_catalog.pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND backend_type NOT IN ('autovacuum worker', 'autovacuum launcher', 'walsender')))::`+cfg.Kind.sqlType())).Scan(&bound)
	case cfg.Kind.timed():
		err = src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`(now() - $1::interval)::`+cfg.Kind.sqlType()), cfg.Boundary).Scan(&bound)
	default:
		err = src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`max(`+ident.Quote(cfg.Control)+`) - $1::bigint`)+` FROM `+st.Name.Sanitize(), cfg.Boundary).Scan(&bound)
	}
	if err != nil {
		return "", fmt.Errorf("compute upper bound: %w", err)
	}
	return deref(bound), nil
}

// checkStatsVisible makes sure the replication role sees every session's
// transaction start; without pg_read_all_stats it sees only its own, and
// 'auto' would be unsafe.
func checkStatsVisible(ctx context.Context, src *pgxpool.Conn) error {
	var ok bool
	var tracked bool
	err := src.QueryRow(ctx, `SELECT pg_has_role('pg_read_all_stats', 'USAGE') OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user),
       current_setting('track_activities')::boolean`).Scan(&ok, &tracked)
	if err != nil {
		return fmt.Errorf("check pg_read_all_stats: %w", err)
	}
	if !ok {
		return errors.New("boundary 'auto' needs to see other sessions' transactions: GRANT pg_read_all_stats TO the replication role on the source")
	}
	if !tracked {
		return errors.New("boundary 'auto' needs track_activities = on on the source to see when transactions started")
	}
	return nil
}

// batchEnd finds the control value that ends the next batch: the limit-th
// row's value (final=false) or, with fewer rows left, the largest one
// (final=true); "" when no rows are left.
func batchEnd(ctx context.Context, src *pgxpool.Conn, cfg *incConfig, st *sourceTable, last, bound string, limit int) (string, bool, error) {
	where := window(cfg.Kind, cfg.Control, last, bound, cfg.Kind.upperOp(), cfg.Condition)
	c := ident.Quote(cfg.Control)
	var end string
	// ORDER BY names the table's column: the bare name would be the text
	// output column, which sorts serials as strings ('10' < '9').
	err := src.QueryRow(ctx, `SELECT `+cfg.Kind.text(c)+` AS mimeo_end FROM `+st.Name.Sanitize()+` `+where+
		` ORDER BY `+st.Name.Sanitize()+`.`+c+` OFFSET $1 LIMIT 1`, limit-1).Scan(&end)
	if err == nil {
		return end, false, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return "", false, err
	}
	var maxEnd *string
	if err := src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`max(`+c+`)`)+` FROM `+st.Name.Sanitize()+` `+where).Scan(&maxEnd); err != nil {
		return "", false, err
	}
	return deref(maxEnd), maxEnd != nil, nil
}

// rowsSQL is the COPY of the source rows matching where.
func rowsSQL(st *sourceTable, where string) string {
	return "COPY (SELECT " + columnList(st.Columns) + " FROM " + st.Name.Sanitize() + " " + where + ") TO STDOUT (FORMAT binary)"
}

// applyRows writes rows (the output of rowsSQL) to the destination:
// appended (inserter), or through a staging table that replaces rows by
// key (updater), set-based.
func applyRows(ctx context.Context, tx pgx.Tx, cfg *incConfig, st *sourceTable, dest ident.Name, rows io.Reader) (int64, error) {
	if cfg.Type == "inserter" {
		tag, err := tx.Conn().PgConn().CopyFrom(ctx, rows, "COPY "+dest.Sanitize()+" ("+columnList(st.Columns)+") FROM STDIN (FORMAT binary)")
		if err != nil {
			return 0, fmt.Errorf("write to destination: %w", err)
		}
		return tag.RowsAffected(), nil
	}
	stage := ident.Quote("mimeo_stage")
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+stage+" ("+columnDefs(st.Columns)+") ON COMMIT DROP"); err != nil {
		return 0, fmt.Errorf("create staging table: %w", err)
	}
	tag, err := tx.Conn().PgConn().CopyFrom(ctx, rows, "COPY "+stage+" ("+columnList(st.Columns)+") FROM STDIN (FORMAT binary, FREEZE)")
	if err != nil {
		return 0, fmt.Errorf("write to destination: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return 0, nil
	}
	keys := make([]string, len(cfg.PkField))
	for i, k := range cfg.PkField {
		keys[i] = "d." + ident.Quote(k) + " = s." + ident.Quote(k)
	}
	// No ANALYZE of the staging table: sqlKeyedJoins leaves the planner
	// the destination's key index, which is what a batch wants.
	if err := execAll(ctx, tx, "replace rows", []string{
		sqlKeyedJoins,
		"DELETE FROM " + dest.Sanitize() + " d USING " + stage + " s WHERE " + strings.Join(keys, " AND "),
		sqlAnyJoins,
	}); err != nil {
		return 0, err
	}
	if _, err := tx.Exec(ctx, "INSERT INTO "+dest.Sanitize()+" ("+columnList(st.Columns)+") SELECT "+columnList(st.Columns)+" FROM "+stage); err != nil {
		return 0, fmt.Errorf("insert rows: %w", err)
	}
	return tag.RowsAffected(), nil
}

// advance moves last_value forward inside the batch's transaction; it
// refuses to move it backwards.
func advance(ctx context.Context, tx pgx.Tx, cfg *incConfig, dest, value string) error {
	t := cfg.Kind.sqlType()
	tag, err := tx.Exec(ctx, "UPDATE "+typeConfigTable(cfg.Type)+" SET last_value = $2::text WHERE dest_table = $1 AND (last_value IS NULL OR last_value::"+t+" <= $2::text::"+t+")", dest, value)
	if err != nil {
		return fmt.Errorf("advance last_value: %w", err)
	}
	if tag.RowsAffected() != 1 {
		return fmt.Errorf("last_value of %s would move backwards to %s; nothing applied", dest, value)
	}
	return nil
}

// repullRange deletes and re-pulls the rows with control values strictly
// between start and end (end defaults to last_value, inclusive), in one
// transaction; the updater also replaces rows by key.
func (a *Agent) repullRange(ctx context.Context, r *run, src *pgxpool.Conn, cfg *incConfig, st *sourceTable, start, end *string) error {
	canon := func(v *string, what string) (string, error) {
		if v == nil {
			return "", nil
		}
		var out string
		if err := src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`$1::text::`+cfg.Kind.sqlType()), *v).Scan(&out); err != nil {
			return "", fmt.Errorf("%s %q is not a valid %s: %w", what, *v, cfg.Kind.sqlType(), err)
		}
		return out, nil
	}
	lower, err := canon(start, "p_repull_start")
	if err != nil {
		return fmt.Errorf("repull %s: %w", r.dest, err)
	}
	upper, err := canon(end, "p_repull_end")
	if err != nil {
		return fmt.Errorf("repull %s: %w", r.dest, err)
	}
	if cfg.LastValue == nil { // nothing copied yet: nothing to re-pull
		return withTx(ctx, r.dst, func(tx pgx.Tx) error { return a.finishInc(ctx, tx, r, cfg, st, 0, 0, nil) })
	}
	// Rows after last_value belong to the next catch-up, not to a repull:
	// taking them here would copy them twice.
	op := "<"
	if end == nil {
		upper, op = *cfg.LastValue, "<="
	} else {
		var past bool
		if err := src.QueryRow(ctx, `SELECT $1::text::`+cfg.Kind.sqlType()+` > $2::text::`+cfg.Kind.sqlType(), upper, *cfg.LastValue).Scan(&past); err != nil {
			return fmt.Errorf("repull %s: compare p_repull_end with last_value: %w", r.dest, err)
		}
		if past {
			upper, op = *cfg.LastValue, "<="
		}
	}
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "DELETE FROM "+r.dest.Sanitize()+" "+window(cfg.Kind, cfg.Control, lower, upper, op, "")); err != nil {
			return fmt.Errorf("repull %s: delete range: %w", r.dest, err)
		}
		var rows int64
		// A range may be most of the table: piped, not spooled.
		err := pipeRows(ctx, src.Conn().PgConn(), rowsSQL(st, window(cfg.Kind, cfg.Control, lower, upper, op, cfg.Condition)), func(in io.Reader) error {
			var err error
			rows, err = applyRows(ctx, tx, cfg, st, r.dest, in)
			return err
		})
		if err != nil {
			return fmt.Errorf("repull %s: %w", r.dest, err)
		}
		msg := fmt.Sprintf("re-pulled %d rows with %s in (%s, %s%s", rows, cfg.Control, orDash(lower), upper, map[string]string{"<": ")", "<=": "]"}[op])
		r.note(ctx, "Repull range", msg, false)
		if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
			return fmt.Errorf("record run: %w", err)
		}
		return r.complete(ctx, tx, rows, msg)
	})
}

func orDash(s string) string {
	if s == "" {
		return "-infinity"
	}
	return s
}
