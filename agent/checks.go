package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/triggers"
)

// validateRowcount compares the row counts of a table's source and
// destination over what is replicated.
func (a *Agent) validateRowcount(ctx context.Context, r *run) error {
	fail := func(err error) error { return fmt.Errorf("validate_rowcount %s: %w", r.dest, err) }
	targets, err := loadCheckTargets(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return fail(err)
	}
	t := targets[0]
	src, _, err := a.openSource(ctx, r, sourceSpec{Dblink: t.Dblink, Table: t.Source.String(),
		Filter: nullIfEmpty(t.Filter), Condition: t.Condition})
	if err != nil {
		return fail(err)
	}
	defer src.Release()
	var srcRows, dstRows, pending int64
	var pendingWhat string
	var truncated bool // a TRUNCATE is queued: the destination has not emptied yet
	err = func() error {
		stx, err := beginSnapshot(ctx, src)
		if err != nil {
			return err
		}
		defer func() { _ = stx.Rollback(context.WithoutCancel(ctx)) }()
		lsn, err := walInsertLSN(ctx, stx)
		if err != nil {
			return err
		}
		if err := stx.QueryRow(ctx, "SELECT count(*) FROM "+t.Source.Sanitize()+optWhere(t.sourceWhere())).Scan(&srcRows); err != nil {
			return fmt.Errorf("count the source's rows: %w", err)
		}
		switch {
		case t.Queue != nil:
			pendingWhat = "changes queued on the source"
			err = stx.QueryRow(ctx, "SELECT count(*), count(*) FILTER (WHERE "+ident.Quote(triggers.ColTruncated)+" IS NOT NULL) > 0 FROM "+
				t.Queue.Sanitize()).Scan(&pending, &truncated)
		case t.Type == "updater" && t.LastValue != nil:
			pendingWhat = "source rows changed past last_value"
			err = stx.QueryRow(ctx, "SELECT count(*) FROM "+t.Source.Sanitize()+" WHERE "+t.pastLastValue()).Scan(&pending)
		}
		if err != nil {
			return fmt.Errorf("count the changes not applied yet: %w", err)
		}
		if t.Type == "logical" {
			if err := a.waitForStream(ctx, r, t.Dblink, lsn); err != nil {
				return err
			}
		}
		if err := r.dst.QueryRow(ctx, "SELECT count(*) FROM "+t.Dest.Sanitize()+optWhere(t.destWhere())).Scan(&dstRows); err != nil {
			return fmt.Errorf("count the destination's rows: %w", err)
		}
		return nil
	}()
	if err != nil {
		return fail(err)
	}
	row := checkRow{Dest: r.req.DestTable, Kind: "rowcount", SourceRows: &srcRows, DestRows: &dstRows}
	diff := dstRows - srcRows
	if diff < 0 {
		diff = -diff
	}
	switch {
	case diff == 0:
		row.OK, row.Detail = true, fmt.Sprintf("source and destination have %d rows", srcRows)
	case t.keepsDeleted() && dstRows > srcRows:
		row.OK = true
		row.Detail = fmt.Sprintf("source %d rows, destination %d: an %s keeps the rows its source deleted (validate() compares them row by row)",
			srcRows, dstRows, t.Type)
	case truncated:
		row.OK = true
		row.Detail = fmt.Sprintf("source %d rows, destination %d: not compared, a TRUNCATE of the source is queued and not applied yet; refresh, then validate",
			srcRows, dstRows)
	case diff <= pending:
		row.OK = true
		row.Detail = fmt.Sprintf("source %d rows, destination %d: the difference is within the %d %s, which the next refresh applies",
			srcRows, dstRows, pending, pendingWhat)
	default:
		row.Detail = fmt.Sprintf("source %d rows, destination %d", srcRows, dstRows)
		if pending > 0 {
			row.Detail += fmt.Sprintf(" (%d %s)", pending, pendingWhat)
		}
	}
	if t.Type == "logical" {
		row.Detail += "; the stream had applied everything the source committed before the count"
	}
	return r.completeChecks(ctx, row.message(), row)
}

// bySource groups targets by their dblink_mapping id, in order.
func bySource(targets []*checkTarget) [][]*checkTarget {
	var groups [][]*checkTarget
	for _, t := range targets {
		if n := len(groups); n > 0 && groups[n-1][0].Dblink == t.Dblink {
			groups[n-1] = append(groups[n-1], t)
			continue
		}
		groups = append(groups, []*checkTarget{t})
	}
	return groups
}

// checkAll runs check on every replicated table, one source connection per
// source; a source that cannot be reached fails each of its tables' rows.
func (a *Agent) checkAll(ctx context.Context, r *run, kind string, targets []*checkTarget,
	check func(src *pgxpool.Conn, t *checkTarget) (checkRow, error)) error {
	var rows []checkRow
	var bad []string // the tables whose check failed, with why
	add := func(row checkRow) {
		rows = append(rows, row)
		if !row.OK {
			bad = append(bad, row.Dest+" ("+row.Detail+")")
		}
	}
	for _, group := range bySource(targets) {
		src, desc, err := a.sources.acquire(ctx, r.dst, group[0].Dblink)
		if err != nil {
			for _, t := range group {
				add(checkRow{Dest: t.Dest.String(), Kind: kind, Detail: "cannot reach its source: " + err.Error()})
			}
			continue
		}
		start, badBefore := time.Now(), len(bad)
		for _, t := range group {
			row, err := check(src, t)
			if err != nil {
				if ctx.Err() != nil {
					src.Release()
					return ctx.Err()
				}
				row = checkRow{Dest: t.Dest.String(), Kind: kind, Detail: fmt.Sprintf("cannot check it on source %d (%s): %v", t.Dblink, desc, err)}
			}
			add(row)
		}
		src.Release()
		r.job.add(ctx, fmt.Sprintf("Check source %d", group[0].Dblink), start, jobOK,
			fmt.Sprintf("%s on %s: %d not ok", plural(len(group), "table", "tables"), desc, len(bad)-badBefore))
	}
	msg := fmt.Sprintf("ok: all %d tables", len(rows))
	if len(bad) > 0 {
		msg = fmt.Sprintf("%d of %d tables: %s", len(bad), len(rows), strings.Join(bad, "; "))
	}
	return r.completeChecks(ctx, msg, rows...)
}

// checkSourceColumns finds every replicated table whose source columns no
// longer match its destination's.
func (a *Agent) checkSourceColumns(ctx context.Context, r *run) error {
	targets, err := loadCheckTargets(ctx, r.dst, "")
	if err != nil {
		return err
	}
	return a.checkAll(ctx, r, "columns", targets, func(src *pgxpool.Conn, t *checkTarget) (checkRow, error) {
		row := checkRow{Dest: t.Dest.String(), Kind: "columns"}
		st, err := describeSource(ctx, src, t.Source, nullIfEmpty(t.Filter), "", false)
		if errors.Is(err, ErrSourceTableMissing) {
			row.Detail = fmt.Sprintf("the source table %s does not exist", t.Source)
			return row, nil
		}
		if err != nil {
			return row, err
		}
		d, err := checkColumns(ctx, r.dst, t.Dest, st, t.Columns, t.ownColumns()...)
		if err != nil {
			row.Detail = err.Error()
			return row, nil
		}
		if d.none() {
			row.OK, row.Detail = true, fmt.Sprintf("%d columns match %s", len(st.Columns), t.Source)
			return row, nil
		}
		row.Detail = fmt.Sprintf("the columns of %s changed: %s", t.Source, d)
		if t.Type != "snap" {
			row.Detail += fmt.Sprintf("; rebuild with SELECT mimeo.refresh_%s(%s, p_repull => true)", t.Type, quoteLiteral(t.Dest.String()))
		} else {
			row.Detail += "; the next refresh rebuilds it"
		}
		return row, nil
	})
}

// checkMissingSourceTables finds every replicated table whose source
// table is gone.
func (a *Agent) checkMissingSourceTables(ctx context.Context, r *run) error {
	targets, err := loadCheckTargets(ctx, r.dst, "")
	if err != nil {
		return err
	}
	return a.checkAll(ctx, r, "missing", targets, func(src *pgxpool.Conn, t *checkTarget) (checkRow, error) {
		row := checkRow{Dest: t.Dest.String(), Kind: "missing"}
		var exists bool
		if err := src.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, t.Source.Sanitize()).Scan(&exists); err != nil {
			return row, err
		}
		if exists {
			row.OK, row.Detail = true, fmt.Sprintf("%s exists", t.Source)
		} else {
			row.Detail = fmt.Sprintf("the source table %s does not exist on source %d; remove the copy with %s, or restore the source",
				t.Source, t.Dblink, destroyerOf(t.Type))
		}
		return row, nil
	})
}

// destroyerOf names the destroyer function of a replication type.
func destroyerOf(typ string) string {
	if typ == "snap" {
		return "snapshot_destroyer"
	}
	return typ + "_destroyer"
}

// snapshotMonitorArgs are the arguments of mimeo.snapshot_monitor().
type snapshotMonitorArgs struct {
	Rowcount *int64 `json:"rowcount"`
	Size     *int64 `json:"size"`
}

// snapshotMonitor reports snap tables whose source has grown to p_rowcount
// rows or p_size bytes, with how much of it changed since the last copy.
func (a *Agent) snapshotMonitor(ctx context.Context, r *run) error {
	var args snapshotMonitorArgs
	if err := r.args(&args); err != nil {
		return err
	}
	all, err := loadCheckTargets(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return err
	}
	var targets []*checkTarget
	for _, t := range all {
		if t.Type == "snap" {
			targets = append(targets, t)
		}
	}
	return a.checkAll(ctx, r, "snapshot_monitor", targets, func(src *pgxpool.Conn, t *checkTarget) (checkRow, error) {
		row := checkRow{Dest: t.Dest.String(), Kind: "snapshot_monitor"}
		var rows, size int64
		var writes, copied *int64
		err := src.QueryRow(ctx, `
SELECT greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid),
       (SELECT s.n_tup_ins + s.n_tup_upd + s.n_tup_del FROM pg_catalog.pg_stat_all_tables s WHERE s.relid = c.oid)
FROM pg_catalog.pg_class c WHERE c.oid = to_regclass($1)`, t.Source.Sanitize()).Scan(&rows, &size, &writes)
		if errors.Is(err, pgx.ErrNoRows) {
			row.Detail = fmt.Sprintf("the source table %s does not exist", t.Source)
			return row, nil
		}
		if err != nil {
			return row, err
		}
		if err := r.dst.QueryRow(ctx, `SELECT n_tup_ins + n_tup_upd + n_tup_del FROM mimeo.refresh_config_snap WHERE dest_table = $1`,
			t.Dest.String()).Scan(&copied); err != nil {
			return row, err
		}
		row.SourceRows = &rows
		big := (args.Rowcount != nil && rows >= *args.Rowcount) || (args.Size != nil && size >= *args.Size)
		row.OK = !big
		row.Detail = fmt.Sprintf("about %d rows, %s on the source", rows, bytesText(size))
		if writes != nil && copied != nil && *writes >= *copied {
			changed := *writes - *copied
			row.Detail += fmt.Sprintf("; %d rows written since the last copy", changed)
			if big && rows > 0 && changed*10 < rows {
				row.Detail += ": little changes between copies, so a dml, logdel or logical table would move only those changes"
			}
		}
		if big {
			row.Detail = "large: " + row.Detail
		}
		return row, nil
	})
}

// bytesText renders a byte count for a DBA.
func bytesText(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d bytes", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTPE"[exp])
}

// optWhere is " WHERE (cond)", or nothing for no condition.
func optWhere(cond string) string {
	if cond == "" {
		return ""
	}
	return " WHERE (" + cond + ")"
}
