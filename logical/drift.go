package logical

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// ColumnDrift compares a logical table's source columns now with those
// the stream last saw (pgoutput describes a table only with its next
// change, so an ALTER TABLE on an idle table is not in the stream yet).
// It returns, as the stream would fail the table with at that change, why
// the copy cannot follow: a column dropped or renamed that the destination
// has, or one added with a default or NOT NULL (its existing rows' values
// are not in the stream). A column added without either returns "": the
// stream adds it with the next change.
func ColumnDrift(ctx context.Context, src, dst DB, dest string) (string, error) {
	var (
		srcTable     string
		seen, filter []string
		destHas      []string
	)
	err := dst.QueryRow(ctx, `SELECT c.source_table, coalesce(c.columns, '{}'), coalesce(c.filter, '{}'),
       array(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = to_regclass(c.dest_table) AND a.attnum > 0 AND NOT a.attisdropped)
FROM ONLY mimeo.refresh_config_logical c WHERE c.dest_table = $1`, dest).Scan(&srcTable, &seen, &filter, &destHas)
	if err != nil {
		return "", fmt.Errorf("read the columns of %s: %w", dest, err)
	}
	if len(seen) == 0 {
		return "", nil // the stream has not recorded them yet
	}
	name, err := ident.Parse(srcTable)
	if err != nil {
		return "", err
	}
	rows, err := src.Query(ctx, `SELECT a.attname::text, a.attnotnull OR a.atthasdef OR a.atthasmissing
FROM pg_catalog.pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum`, name.Sanitize())
	if err != nil {
		return "", fmt.Errorf("read the columns of source table %s: %w", name, err)
	}
	type column struct {
		name   string
		filled bool // NOT NULL, a default, or a value for existing rows
	}
	now, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (column, error) {
		var c column
		err := r.Scan(&c.name, &c.filled)
		return c, err
	})
	if err != nil {
		return "", fmt.Errorf("read the columns of source table %s: %w", name, err)
	}
	if len(now) == 0 {
		return "", nil // gone or unreadable: the stream and the repull say so
	}
	var problems, filled []string
	for _, c := range seen {
		if !slices.ContainsFunc(now, func(n column) bool { return n.name == c }) && slices.Contains(destHas, c) {
			problems = append(problems, droppedColumn(c))
		}
	}
	for _, c := range now {
		if c.filled && len(filter) == 0 && !slices.Contains(seen, c.name) && !slices.Contains(destHas, c.name) {
			filled = append(filled, c.name)
		}
	}
	if len(filled) > 0 {
		problems = append(problems, filledColumns(filled))
	}
	if len(problems) == 0 {
		return "", nil
	}
	return strings.Join(problems, "; ") + RepullHint(dest), nil
}
