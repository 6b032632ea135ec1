package agent

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// incMakerArgs are the arguments of inserter_maker / updater_maker.
type incMakerArgs struct {
	makerArgs
	Control  string   `json:"control"`
	Boundary *string  `json:"boundary"`
	PkField  []string `json:"pk_field"`
	PkType   []string `json:"pk_type"`
}

const sqlIncInsertConfig = `
INSERT INTO %s (dest_table, type, dblink, source_table, filter, condition, create_indexes,
                control, control_type, boundary, last_value, dst_active, columns, post_script %s)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 %s)`

// makeIncremental sets up an inserter or updater table. A new destination
// table is created with the source's indexes and, with p_pulldata, caught
// up in batches like a refresh. Without p_pulldata, or onto an existing
// table used as it is, nothing is pulled: as in the original mimeo,
// replication starts after the table's highest control value or, when it
// has none, where a refresh run would stop now (see startingValue).
func (a *Agent) makeIncremental(ctx context.Context, r *run, typ string) error {
	var args incMakerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("%s_maker %s: %w", typ, r.dest, err) }
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: args.Dblink, Table: args.SrcTable,
		Filter: args.Filter, Condition: args.Condition, Indexes: true})
	if err != nil {
		return fail(err)
	}
	defer src.Release()
	kind, err := controlColumn(st, args.Control)
	if err != nil {
		return fail(err)
	}
	boundary, err := normalizeBoundary(ctx, src, kind, args.Boundary)
	if err != nil {
		return fail(err)
	}
	var keys, keyTypes []string
	if typ == "updater" {
		if keys, keyTypes, err = updaterKey(st, args.PkField, args.PkType); err != nil {
			return fail(err)
		}
	}
	dstActive := false
	if kind == kindTimestamp {
		if err := src.QueryRow(ctx, sqlObservesDST).Scan(&dstActive); err != nil {
			return fail(fmt.Errorf("check source time zone: %w", err))
		}
	}
	existing, err := relationColumns(ctx, r.dst, r.dest)
	if err != nil {
		return fail(err)
	}
	// An existing destination table may have columns of its own: only the
	// copied ones must match.
	cfg := &incConfig{Type: typ, Source: args.SrcTable, Dblink: args.Dblink, Filter: args.Filter, Condition: args.Condition,
		Indexes: args.indexes(), Control: args.Control, Kind: kind, Boundary: boundary, DstActive: dstActive, PkField: keys,
		Columns: columnNames(st.Columns), PostScript: args.PostScript}

	caughtUp := existing != nil || !args.pull()
	// A table made here is loaded at once, as the snap maker does: one
	// COPY into the table just created (frozen), then its indexes, rather
	// than a catch-up of batches maintaining them row by row.
	loadNow := existing == nil && args.pull()
	var loaded int64
	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		var configured bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM mimeo.refresh_config WHERE dest_table = $1)`, r.req.DestTable).Scan(&configured); err != nil {
			return err
		}
		if configured {
			return fmt.Errorf("%s: %w", r.dest, ErrDestinationExists)
		}
		msg := ""
		if existing == nil {
			if _, err := tx.Exec(ctx, "CREATE TABLE "+r.dest.Sanitize()+" ("+columnDefs(st.Columns)+")"); err != nil {
				return fmt.Errorf("create %s: %w", r.dest, err)
			}
			if loadNow {
				end, err := a.loadEnd(ctx, r, src, cfg, st)
				if err != nil {
					return err
				}
				if end != "" {
					if loaded, err = r.load(ctx, tx, loadSpec{src: src, table: st, target: r.dest, emptied: true, pull: true,
						condition: window(cfg.Kind, cfg.Control, "", end, "<=", cfg.Condition)}); err != nil {
						return err
					}
					cfg.LastValue = &end
				}
			}
			if args.indexes() {
				if err := r.createIndexes(ctx, tx, st, r.dest); err != nil {
					return err
				}
			}
			if typ == "updater" {
				if err := ensureKeyIndex(ctx, tx, r.dest, keys); err != nil {
					return err
				}
			}
			if err := r.runPostScript(ctx, tx, args.PostScript); err != nil {
				return err
			}
			msg = fmt.Sprintf("created %s; nothing pulled (p_pulldata is false)", r.dest)
			if loadNow {
				// Worded as a refresh's: the load is its first batch.
				msg = fmt.Sprintf("copied %s in 1 batch; %s", plural(int(loaded), "row", "rows"), describeLast(cfg.LastValue))
				if cfg.LastValue == nil {
					msg = "nothing new on the source; " + describeLast(nil)
				}
			}
		} else {
			diff, err := checkIncColumns(ctx, tx, r.dest, st, cfg)
			if err != nil {
				return err
			}
			if !diff.none() {
				return fmt.Errorf("%w: the existing table %s does not match the source %s: %s", ErrColumnsChanged, r.dest, st.Name, diff)
			}
			msg = fmt.Sprintf("using the existing table %s: nothing pulled", r.dest)
		}
		if caughtUp {
			start, err := a.startingValue(ctx, r, tx, src, r.dest, st, cfg)
			if err != nil {
				return err
			}
			cfg.LastValue = &start
			msg += fmt.Sprintf("; replication starts after %s = %s", cfg.Control, start)
		}
		pkCols, pkVals := "", ""
		params := []any{r.req.DestTable, typ, args.Dblink, args.SrcTable, nullIfEmpty(args.Filter), nullString(args.Condition),
			args.indexes(), args.Control, string(kind), boundary, cfg.LastValue, dstActive, cfg.Columns, nullIfEmpty(args.PostScript)}
		if typ == "updater" {
			pkCols, pkVals = ", pk_field, pk_type", ", $15, $16"
			params = append(params, keys, keyTypes)
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(sqlIncInsertConfig, typeConfigTable(typ), pkCols, pkVals), params...); err != nil {
			return fmt.Errorf("record config: %w", err)
		}
		if loadNow {
			if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
				return fmt.Errorf("record run: %w", err)
			}
			r.note(ctx, "Summary", msg, false)
			return r.complete(ctx, tx, loaded, msg)
		}
		if caughtUp {
			return r.complete(ctx, tx, 0, msg)
		}
		return nil
	})
	if err != nil || caughtUp || loadNow {
		if err != nil {
			return fail(err)
		}
		return nil
	}
	cfg.BatchLimit = 10000
	if err := r.dst.QueryRow(ctx, "SELECT batch_limit FROM "+typeConfigTable(typ)+" WHERE dest_table = $1", r.req.DestTable).Scan(&cfg.BatchLimit); err != nil {
		return fail(err)
	}
	return a.catchUp(ctx, r, src, cfg, st, cfg.BatchLimit)
}

// loadEnd is the last control value a maker's first load takes: the
// largest at or below the run's upper bound ("" when there is none yet).
func (a *Agent) loadEnd(ctx context.Context, r *run, src *pgxpool.Conn, cfg *incConfig, st *sourceTable) (string, error) {
	bound, err := a.upperBound(ctx, r, src, cfg, st)
	if err != nil || bound == "" {
		return "", err
	}
	var end *string
	c := ident.Quote(cfg.Control)
	if err := src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`max(`+c+`)`)+` FROM `+st.Name.Sanitize()+` `+
		window(cfg.Kind, cfg.Control, "", bound, cfg.Kind.upperOp(), cfg.Condition)).Scan(&end); err != nil {
		return "", fmt.Errorf("find the last row to copy: %w", err)
	}
	return deref(end), nil
}

// normalizeBoundary checks the boundary against the control column's kind
// and returns it in canonical form; NULL means 10 minutes or 1. A timestamp
// column's boundary needs a unit: a bare number other than zero is refused.
func normalizeBoundary(ctx context.Context, src *pgxpool.Conn, kind controlKind, given *string) (string, error) {
	b := strings.TrimSpace(deref(given))
	switch {
	case strings.EqualFold(b, "auto") && kind.timed():
		return "auto", checkStatsVisible(ctx, src)
	case strings.EqualFold(b, "auto"):
		return "", fmt.Errorf("boundary 'auto' needs a timestamp control column; for %s give an integer boundary such as '1'", describeKind(kind))
	case b == "" && kind.timed():
		return "00:10:00", nil
	case b == "":
		return "1", nil
	case kind.timed() && bareNumber.MatchString(b) && !isZero(b):
		// PostgreSQL would read it as seconds; a zero needs no unit.
		return "", fmt.Errorf("boundary %s has no unit; for a timestamp control column give an interval such as %s (or 'auto')",
			quoteLiteral(b), quoteLiteral(strings.TrimPrefix(b, "+")+" minutes"))
	case kind.timed():
		var canon string
		if err := src.QueryRow(ctx, `SELECT $1::interval::text`, b).Scan(&canon); err != nil {
			return "", fmt.Errorf("boundary %s is not an interval: %w", quoteLiteral(b), err)
		}
		return canon, nil
	default:
		n, err := strconv.ParseInt(b, 10, 64)
		if err != nil || n < 0 {
			return "", fmt.Errorf("boundary %s must be a non-negative integer for %s", quoteLiteral(b), describeKind(kind))
		}
		return strconv.FormatInt(n, 10), nil
	}
}

// bareNumber is a boundary without a unit.
var bareNumber = regexp.MustCompile(`^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)$`)

// isZero reports whether a bare number is zero.
func isZero(number string) bool {
	f, err := strconv.ParseFloat(number, 64)
	return err == nil && f == 0
}

// startingValue is where replication starts when the maker pulls nothing:
// after the destination's highest control value or, when it has none,
// where a refresh run now would stop. Rows past that bound (for 'auto',
// those of transactions still open on the source) are copied by the first
// refresh; the rows before it count as there before replication began.
func (a *Agent) startingValue(ctx context.Context, r *run, tx pgx.Tx, src *pgxpool.Conn, dest ident.Name, st *sourceTable, cfg *incConfig) (string, error) {
	c := ident.Quote(cfg.Control)
	var v *string
	if err := tx.QueryRow(ctx, `SELECT `+cfg.Kind.text(`max(`+c+`)`)+` FROM `+dest.Sanitize()).Scan(&v); err != nil {
		return "", fmt.Errorf("read max %s of %s: %w", cfg.Control, dest, err)
	}
	if v != nil {
		return *v, nil
	}
	bound, err := a.upperBound(ctx, r, src, cfg, st)
	switch {
	case err != nil:
		return "", err
	case bound == "" && cfg.Kind.timed():
		return "", errors.New("cannot tell where replication starts while a prepared transaction is open on the source (see pg_prepared_xacts): resolve it and retry, or pull the data (p_pulldata => true)")
	case bound == "":
		return "0", nil // the source has no rows yet: every one to come is copied
	case !cfg.Kind.timed():
		return bound, nil // serial bounds include themselves
	}
	// A time bound excludes itself (a row at it may still come): start just
	// before it, so that row is copied.
	var start string
	if err := src.QueryRow(ctx, `SELECT `+cfg.Kind.text(`$1::text::`+cfg.Kind.sqlType()+` - interval '1 microsecond'`), bound).Scan(&start); err != nil {
		return "", fmt.Errorf("compute the starting point: %w", err)
	}
	return start, nil
}

// updaterKey picks the columns rows are replaced by: p_pk_field when given,
// else the source's primary key, else its first unique index by name, of
// those whose columns are all copied.
func updaterKey(st *sourceTable, field, types []string) ([]string, []string, error) {
	if len(field) > 0 {
		for _, f := range field {
			i := indexOfColumn(st.Columns, f)
			if i < 0 {
				return nil, nil, fmt.Errorf("p_pk_field names %q, which is not a copied column of %s", f, st.Name)
			}
			c := st.Columns[i]
			// A table says whether a column may be NULL (a view cannot):
			// a NULL key matches nothing and would never be replaced.
			if st.Plain && !c.NotNull {
				return nil, nil, fmt.Errorf("p_pk_field names %q, which may be NULL on %s; a key column must be NOT NULL", f, st.Name)
			}
		}
		return field, types, nil
	}
	candidates := slices.Clone(st.Indexes)
	slices.SortStableFunc(candidates, func(x, y index) int {
		if x.Primary != y.Primary {
			if x.Primary {
				return -1
			}
			return 1
		}
		return strings.Compare(x.Name, y.Name)
	})
	// Indexes name columns of the whole table; p_filter may leave some out.
	var leftOut []string // the first usable key with columns p_filter leaves out
	for _, ix := range candidates {
		if !ix.Unique || ix.HasExpr || len(ix.Columns) == 0 {
			continue
		}
		var cols, typs []string
		usable, copied := true, true
		for _, name := range ix.Columns {
			i := indexOfColumn(st.AllColumns, name)
			if i < 0 || !st.AllColumns[i].NotNull { // as for a replica identity: no NULLs in a key
				usable = false
				break
			}
			copied = copied && containsColumn(st.Columns, name)
			cols, typs = append(cols, name), append(typs, st.AllColumns[i].Type)
		}
		switch {
		case usable && copied:
			return cols, typs, nil
		case usable && leftOut == nil:
			leftOut = cols
		}
	}
	if leftOut != nil {
		names := make([]string, len(leftOut))
		for i, c := range leftOut {
			names[i] = ident.Display(c)
		}
		return nil, nil, fmt.Errorf("p_filter must include the key columns (%s) of %s to replace rows by, or give p_pk_field and p_pk_type",
			strings.Join(names, ", "), st.Name)
	}
	return nil, nil, fmt.Errorf("source table %s has no primary key or unique index to replace rows by: give p_pk_field and p_pk_type", st.Name)
}

// ensureKeyIndex makes sure the destination has a unique index on exactly
// the key columns, which the set-based replace relies on.
func ensureKeyIndex(ctx context.Context, tx pgx.Tx, dest ident.Name, keys []string) error {
	var exists bool
	err := tx.QueryRow(ctx, `
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_index i
    WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indexprs IS NULL AND i.indpred IS NULL
      AND (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) = $2::text[])`,
		dest.Sanitize(), keys).Scan(&exists)
	if err != nil {
		return fmt.Errorf("look for a key index on %s: %w", dest, err)
	}
	if exists {
		return nil
	}
	cols := make([]string, len(keys))
	for i, k := range keys {
		cols[i] = ident.Quote(k)
	}
	name := ident.Derive(dest.Table, "_mimeo_key")
	if _, err := tx.Exec(ctx, "CREATE UNIQUE INDEX "+ident.Quote(name)+" ON "+dest.Sanitize()+" ("+strings.Join(cols, ", ")+")"); err != nil {
		return fmt.Errorf("create key index on %s: %w", dest, err)
	}
	return nil
}
