package agent

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// loadSpec says how to fill a destination table from a source table.
type loadSpec struct {
	src       *pgxpool.Conn
	table     *sourceTable
	condition string
	target    ident.Name
	create    bool   // create target first (else it is truncated)
	emptied   bool   // target is empty already (neither created nor truncated)
	thawed    bool   // load without FREEZE (the target was not created or truncated in tx)
	cascade   bool   // TRUNCATE ... CASCADE
	pull      bool   // copy the rows (else leave target empty)
	indexes   bool   // re-create the source's indexes after the load
	keep      access // owner and grants a created target gets at once (see accessOf)
}

// load fills spec.target inside tx: create or truncate it, stream the
// source's rows in with COPY, then build indexes and ANALYZE — indexes
// built once over loaded data are much cheaper than maintained row by row.
func (r *run) load(ctx context.Context, tx pgx.Tx, spec loadSpec) (int64, error) {
	t := spec.target.Sanitize()
	if spec.create {
		if _, err := tx.Exec(ctx, "CREATE TABLE "+t+" ("+columnDefs(spec.table.Columns)+")"); err != nil {
			return 0, fmt.Errorf("create %s: %w", spec.target, err)
		}
		if err := spec.keep.restore(ctx, tx); err != nil {
			return 0, err
		}
	} else if !spec.emptied {
		q := "TRUNCATE " + t
		if spec.cascade {
			q += " CASCADE"
		}
		if _, err := tx.Exec(ctx, q); err != nil {
			return 0, fmt.Errorf("truncate %s: %w", spec.target, err)
		}
	}
	var rows int64
	if spec.pull {
		err := r.step(ctx, "Copy rows from source "+spec.table.Name.String(), func() (string, error) {
			var err error
			in := copyInSQL(spec.target, spec.table.Columns)
			if spec.thawed {
				in = strings.Replace(in, ", FREEZE)", ")", 1)
			}
			rows, err = copyRows(ctx, spec.src.Conn().PgConn(), copyOutSQL(spec.table, spec.condition),
				tx.Conn().PgConn(), in)
			return fmt.Sprintf("copied %d rows into %s", rows, spec.target), err
		})
		if err != nil {
			return 0, fmt.Errorf("copy %s into %s: %w", spec.table.Name, spec.target, err)
		}
	}
	if spec.indexes && spec.create {
		if err := r.createIndexes(ctx, tx, spec.table, spec.target); err != nil {
			return 0, err
		}
	}
	if spec.pull {
		if _, err := tx.Exec(ctx, "ANALYZE "+t); err != nil {
			return 0, fmt.Errorf("analyze %s: %w", spec.target, err)
		}
	}
	return rows, nil
}

// logicalRun reports whether the run makes or repulls a logical table.
func (r *run) logicalRun() bool {
	return r.req.Action == "logical_maker" || r.req.Action == "refresh_logical"
}

// deferrableUnique reports whether ix is a plain unique index (btree,
// columns only, nothing included, default operator classes) that can be
// made a DEFERRABLE unique constraint. A logical table's stream applies a
// batch set-based, not in the source's row order: values swapped between
// rows (a = x, b = y to a = y, b = x through a temporary value) collide
// midway unless the check waits for the batch's end.
func deferrableUnique(ix index) bool {
	return ix.Unique && !ix.Primary && !ix.HasExpr && len(ix.Columns) > 0 &&
		ix.Body == ix.Plain
}

// createIndexes re-creates the source table's indexes on target. An index
// that cannot be built there (a filtered-out column, say) is skipped with a
// warning; a savepoint keeps the failure from aborting the transaction.
func (r *run) createIndexes(ctx context.Context, tx pgx.Tx, src *sourceTable, target ident.Name) error {
	if len(src.Indexes) == 0 {
		return nil
	}
	return r.step(ctx, "Create indexes on "+target.String(), func() (string, error) {
		var made, skipped []string
		for _, ix := range src.Indexes {
			name := indexName(ix.Name, src.Name.Table, target.Table)
			q := "CREATE "
			if ix.Unique {
				q += "UNIQUE "
			}
			q += "INDEX " + ident.Quote(name) + " ON " + target.Sanitize() + " " + ix.Body
			if r.logicalRun() && deferrableUnique(ix) {
				q = "ALTER TABLE " + target.Sanitize() + " ADD CONSTRAINT " + ident.Quote(name) + " UNIQUE (" + quoteNames(ix.Columns) + ") DEFERRABLE"
			}
			if _, err := tx.Exec(ctx, "SAVEPOINT mimeo_index"); err != nil {
				return "", fmt.Errorf("create index %s: %w", name, err)
			}
			_, err := tx.Exec(ctx, q)
			if err == nil && ix.Primary {
				_, err = tx.Exec(ctx, "ALTER TABLE "+target.Sanitize()+" ADD CONSTRAINT "+ident.Quote(name)+" PRIMARY KEY USING INDEX "+ident.Quote(name))
			}
			if err != nil {
				if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT mimeo_index"); rerr != nil {
					return "", fmt.Errorf("skip index %s: %w", name, rerr)
				}
				skipped = append(skipped, fmt.Sprintf("%s (%v)", ix.Name, err))
				continue
			}
			if _, err := tx.Exec(ctx, "RELEASE SAVEPOINT mimeo_index"); err != nil {
				return "", fmt.Errorf("create index %s: %w", name, err)
			}
			made = append(made, name)
		}
		if len(skipped) > 0 {
			r.note(ctx, "Skip indexes", "could not re-create source indexes: "+strings.Join(skipped, "; "), true)
		}
		return fmt.Sprintf("created %d indexes: %s", len(made), strings.Join(made, ", ")), nil
	})
}

// indexName renames a source index for a destination table: the source
// table's name at its start becomes the destination's ("items_pkey" on
// items_snap1 is "items_snap1_pkey"), else the table name is prefixed.
func indexName(index, srcTable, dstTable string) string {
	if rest, ok := strings.CutPrefix(index, srcTable); ok {
		return ident.Derive(dstTable, rest)
	}
	return ident.Derive(dstTable, "_"+index)
}

// execAll runs statements in order (grants, post scripts).
func execAll(ctx context.Context, tx pgx.Tx, what string, statements []string) error {
	for _, q := range statements {
		if _, err := tx.Exec(ctx, q); err != nil {
			return fmt.Errorf("%s %q: %w", what, q, err)
		}
	}
	return nil
}
