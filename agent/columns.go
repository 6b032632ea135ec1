package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/internal/owner"
	"github.com/mimeo-dev/mimeo/queue"
)

// Source column changes for the types that keep a plain destination table
// (inserter, updater, dml, logdel): every run compares the source's columns
// with those the destination was built with and fails, naming what
// changed, until a repull rebuilds the destination. The rebuild alters the
// table in place, so its owner, grants, and indexes on the columns that
// stay, survive.

// columnDiff is how a table's source columns differ from those its
// destination was built with.
type columnDiff struct {
	Dropped []string  // built with, no longer on the source (dropped or renamed)
	Added   []column  // on the source, not built with
	Retyped []retyped // of another type on the source now
	Missing []column  // built with and still on the source, but gone from the destination
}

// retyped is a column whose source type changed.
type retyped struct {
	Now column // as the source has it
	Was string // the destination's type
}

func (d columnDiff) none() bool {
	return len(d.Dropped)+len(d.Added)+len(d.Retyped)+len(d.Missing) == 0
}

func (d columnDiff) String() string {
	var parts []string
	for _, c := range d.Dropped {
		parts = append(parts, fmt.Sprintf("column %q was dropped or renamed", c))
	}
	for _, c := range d.Added {
		parts = append(parts, fmt.Sprintf("column %q (%s) was added", c.Name, c.Type))
	}
	for _, c := range d.Retyped {
		parts = append(parts, fmt.Sprintf("column %q changed type from %s to %s", c.Now.Name, c.Was, c.Now.Type))
	}
	for _, c := range d.Missing {
		parts = append(parts, fmt.Sprintf("column %q is missing on the destination", c.Name))
	}
	return strings.Join(parts, "; ")
}

// diffColumns compares the source's columns now (after the filter) with
// those the destination was built with: recorded in the config or, for
// tables made before mimeo 0.4.0 (nil), the destination's own columns but
// mimeo's (own). dest are the destination table's columns.
func diffColumns(recorded []string, dest, src []column, own ...string) columnDiff {
	built := recorded
	if built == nil {
		for _, c := range dest {
			if !slices.Contains(own, c.Name) {
				built = append(built, c.Name)
			}
		}
	}
	var d columnDiff
	for _, name := range built {
		if !containsColumn(src, name) {
			d.Dropped = append(d.Dropped, name)
		}
	}
	for _, c := range src {
		if !slices.Contains(built, c.Name) {
			d.Added = append(d.Added, c)
			continue
		}
		i := indexOfColumn(dest, c.Name)
		switch {
		case i < 0:
			d.Missing = append(d.Missing, c)
		case dest[i].Type != c.Type:
			d.Retyped = append(d.Retyped, retyped{Now: c, Was: dest[i].Type})
		}
	}
	return d
}

// columnsChangedError says what changed and the call that rebuilds the
// destination.
func columnsChangedError(st *sourceTable, d columnDiff, typ, dest string) error {
	return fmt.Errorf("%w on %s: %s. Rebuild the destination with the source's current columns: SELECT mimeo.refresh_%s(%s, p_repull => true)",
		ErrColumnsChanged, st.Name, d, typ, quoteLiteral(dest))
}

// checkColumns reads the destination's columns and compares them with the
// source's; nil when nothing changed.
func checkColumns(ctx context.Context, dst queue.DB, dest ident.Name, st *sourceTable, recorded []string, own ...string) (columnDiff, error) {
	current, err := relationColumns(ctx, dst, dest)
	if err != nil {
		return columnDiff{}, err
	}
	if current == nil {
		return columnDiff{}, fmt.Errorf("destination table %s is missing (recreate it with the destroyer and maker)", dest)
	}
	return diffColumns(recorded, current, st.Columns, own...), nil
}

// rebuildColumns alters the destination, in tx, to the source's current
// columns: drops those gone, adds the new ones, retypes the others (by a
// cast, or to NULL when the table was emptied for the reload), re-creates
// the source's indexes it lacks, and runs post_script. Callers reload the
// rows and record the columns in the same transaction.
func (r *run) rebuildColumns(ctx context.Context, tx pgx.Tx, d columnDiff, st *sourceTable, emptied, indexes bool, postScript []string) error {
	dest := r.dest
	var alter []string
	for _, c := range d.Dropped {
		alter = append(alter, "DROP COLUMN IF EXISTS "+ident.Quote(c))
	}
	for _, c := range append(slices.Clone(d.Added), d.Missing...) {
		def := "ADD COLUMN " + ident.Quote(c.Name) + " " + c.Type
		if c.NotNull && emptied {
			def += " NOT NULL"
		}
		alter = append(alter, def)
	}
	for _, c := range d.Retyped {
		using := ident.Quote(c.Now.Name) + "::" + c.Now.Type
		if emptied {
			using = "NULL::" + c.Now.Type // no cast may exist; there are no rows to convert
		}
		alter = append(alter, "ALTER COLUMN "+ident.Quote(c.Now.Name)+" TYPE "+c.Now.Type+" USING "+using)
	}
	return r.step(ctx, "Rebuild columns", func() (string, error) {
		if _, err := tx.Exec(ctx, "SAVEPOINT mimeo_alter"); err != nil {
			return "", err
		}
		if _, err := tx.Exec(ctx, "ALTER TABLE "+dest.Sanitize()+" "+strings.Join(alter, ", ")); err != nil {
			err = fmt.Errorf("alter %s to the source's columns (%s): %w", dest, d, err)
			if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT mimeo_alter"); rerr == nil {
				if hint := owner.Hint(ctx, tx, dest.Sanitize()); hint != "" {
					err = fmt.Errorf("%w; %s, then run it again", err, hint)
				}
			}
			return "", err
		}
		if indexes {
			missing, err := missingIndexes(ctx, tx, st, dest)
			if err != nil {
				return "", err
			}
			if err := r.createIndexes(ctx, tx, missing, dest); err != nil {
				return "", err
			}
		}
		return fmt.Sprintf("%s: %s", dest, d), r.runPostScript(ctx, tx, postScript)
	})
}

// runPostScript runs a table's post_script in tx, as one job step: after a
// maker created the table (so a broken entry fails it at once) and after a
// rebuild. The run's connection is closed afterwards, as a SET in the
// script would outlive the transaction.
func (r *run) runPostScript(ctx context.Context, tx pgx.Tx, statements []string) error {
	if len(statements) == 0 {
		return nil
	}
	r.dirty = true
	return r.step(ctx, "Run post_script", func() (string, error) {
		return fmt.Sprintf("ran %d statements", len(statements)), execAll(ctx, tx, "post_script", statements)
	})
}

// missingIndexes is st with only the source indexes dest lacks (by the
// name they get on it): a rebuild re-creates those an altered column took
// with it, and keeps the others.
func missingIndexes(ctx context.Context, tx pgx.Tx, st *sourceTable, dest ident.Name) (*sourceTable, error) {
	rows, err := tx.Query(ctx, `SELECT c.relname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = to_regclass($1)`, dest.Sanitize())
	if err != nil {
		return nil, fmt.Errorf("read the indexes of %s: %w", dest, err)
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("read the indexes of %s: %w", dest, err)
	}
	out := *st
	out.Indexes = nil
	for _, ix := range st.Indexes {
		if !slices.Contains(have, indexName(ix.Name, st.Name.Table, dest.Table)) {
			out.Indexes = append(out.Indexes, ix)
		}
	}
	return &out, nil
}

// columnNames lists the names of cols, as the config records them.
func columnNames(cols []column) []string {
	out := make([]string, len(cols))
	for i, c := range cols {
		out[i] = c.Name
	}
	return out
}
