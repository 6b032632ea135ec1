package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/queue"
)

// column is one column as both sides describe it.
type column struct {
	Name    string
	Type    string // format_type() text, usable in CREATE TABLE
	NotNull bool
}

// tableStats are a source table's cumulative write counters.
type tableStats struct {
	Ins, Upd, Del int64
}

// index is a source index, reduced to what re-creating it needs.
type index struct {
	Name    string
	Primary bool
	Unique  bool
	Columns []string // plain key and INCLUDE columns; empty for expressions
	HasExpr bool
	Body    string // "USING btree (...) [INCLUDE ...] [WHERE ...]"
	// Plain is the body of a btree index of Columns with nothing else
	// (default operator classes and collations, nothing included).
	Plain string
}

// sourceTable is what a run learns about its source table up front.
type sourceTable struct {
	Name    ident.Name
	Plain   bool // an ordinary table: COPY table TO works, counters are kept
	Columns []column
	Stats   *tableStats // nil when the source keeps no counters for it
	// Filenode changes on TRUNCATE, VACUUM FULL and CLUSTER, which leave
	// the write counters alone; nil unless Plain.
	Filenode *int64
	Indexes  []index
	// AllColumns are all the table's columns, which Indexes refer to;
	// Columns are only those p_filter copies.
	AllColumns []column
}

const (
	sqlRelation = `
SELECT c.oid, c.relkind = 'r', has_any_column_privilege(c.oid, 'SELECT')
FROM pg_catalog.pg_class c WHERE c.oid = to_regclass($1)`

	sqlColumns = `
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum`

	// Counters are only trusted for ordinary tables (a partitioned parent
	// or a view counts nothing) and when track_counts is on.
	sqlStats = `
SELECT s.n_tup_ins, s.n_tup_upd, s.n_tup_del
FROM pg_catalog.pg_stat_all_tables s
JOIN pg_catalog.pg_class c ON c.oid = s.relid AND c.relkind = 'r'
WHERE s.relid = $1 AND current_setting('track_counts')::boolean`

	// pg_get_indexdef() prints "CREATE [UNIQUE] INDEX <name> ON <table>
	// USING <am> (...)"; the prefix is rebuilt here with the same quoting,
	// so the body can be cut off exactly and put on another table.
	sqlIndexes = `
SELECT ic.relname, i.indisprimary, i.indisunique, pg_get_indexdef(i.indexrelid),
       'CREATE ' || CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END || 'INDEX ' || quote_ident(ic.relname)
           || ' ON ' || CASE WHEN c.relkind = 'p' THEN 'ONLY ' ELSE '' END
           || quote_ident(n.nspname) || '.' || quote_ident(c.relname) || ' ',
       coalesce(k.names, '{}'),
       i.indexprs IS NOT NULL OR i.indpred IS NOT NULL,
       'USING btree (' || coalesce(k.quoted, '') || ')'
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL (
    SELECT array_agg(a.attname ORDER BY k.ord) AS names, string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) AS quoted
    FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) k ON true
WHERE i.indrelid = $1 AND i.indisvalid AND i.indislive
ORDER BY i.indisprimary DESC, ic.relname`
)

// describeSource reads the source table's columns (restricted to filter
// when given), counters and, when withIndexes, indexes. condition is
// checked by preparing a query with it: the extended protocol refuses a
// second statement, so a condition cannot smuggle one in.
func describeSource(ctx context.Context, q queue.DB, name ident.Name, filter []string, condition string, withIndexes bool) (*sourceTable, error) {
	var oid uint32
	t := &sourceTable{Name: name}
	var canSelect bool
	err := q.QueryRow(ctx, sqlRelation, name.Sanitize()).Scan(&oid, &t.Plain, &canSelect)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%s: %w", name, ErrSourceTableMissing)
	}
	if err != nil {
		return nil, fmt.Errorf("look up source table %s: %w", name, err)
	}
	if !canSelect {
		return nil, fmt.Errorf("source table %s: the replication role lacks SELECT on it (GRANT SELECT ON %s TO <role>)", name, name)
	}
	cols, err := readColumns(ctx, q, oid)
	if err != nil {
		return nil, fmt.Errorf("read columns of source table %s: %w", name, err)
	}
	t.AllColumns = cols
	if t.Columns, err = filterColumns(cols, filter); err != nil {
		return nil, fmt.Errorf("source table %s: %w", name, err)
	}
	if condition != "" {
		// A parameter forces the extended protocol; LIMIT 0 reads nothing.
		probe := "SELECT 1 FROM " + name.Sanitize() + " " + whereClause(condition) + " LIMIT $1"
		if _, err := q.Exec(ctx, probe, 0); err != nil {
			return nil, fmt.Errorf("condition %q on source table %s: %w", condition, name, err)
		}
	}
	var s tableStats
	err = q.QueryRow(ctx, sqlStats, oid).Scan(&s.Ins, &s.Upd, &s.Del)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return nil, fmt.Errorf("read statistics of source table %s: %w", name, err)
	default:
		t.Stats = &s
	}
	if t.Plain {
		if err := q.QueryRow(ctx, `SELECT pg_relation_filenode($1::oid)::bigint`, oid).Scan(&t.Filenode); err != nil {
			return nil, fmt.Errorf("read file node of source table %s: %w", name, err)
		}
	}
	if withIndexes {
		if t.Indexes, err = readIndexes(ctx, q, oid); err != nil {
			return nil, fmt.Errorf("read indexes of source table %s: %w", name, err)
		}
	}
	return t, nil
}

// readColumns lists a relation's live columns in order.
func readColumns(ctx context.Context, q queue.DB, oid uint32) ([]column, error) {
	rows, err := q.Query(ctx, sqlColumns, oid)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (column, error) {
		var c column
		err := row.Scan(&c.Name, &c.Type, &c.NotNull)
		return c, err
	})
}

// relationColumns lists the columns of a destination relation, nil when it
// does not exist.
func relationColumns(ctx context.Context, q queue.DB, name ident.Name) ([]column, error) {
	var oid *uint32
	if err := q.QueryRow(ctx, `SELECT to_regclass($1)::oid`, name.Sanitize()).Scan(&oid); err != nil {
		return nil, fmt.Errorf("look up %s: %w", name, err)
	}
	if oid == nil {
		return nil, nil
	}
	cols, err := readColumns(ctx, q, *oid)
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", name, err)
	}
	return cols, nil
}

func readIndexes(ctx context.Context, q queue.DB, oid uint32) ([]index, error) {
	rows, err := q.Query(ctx, sqlIndexes, oid)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (index, error) {
		var ix index
		var def, prefix string
		if err := row.Scan(&ix.Name, &ix.Primary, &ix.Unique, &def, &prefix, &ix.Columns, &ix.HasExpr, &ix.Plain); err != nil {
			return ix, err
		}
		body, ok := strings.CutPrefix(def, prefix)
		if !ok {
			return ix, fmt.Errorf("index %s: unexpected definition %q", ix.Name, def)
		}
		ix.Body = body
		return ix, nil
	})
}

// filterColumns keeps the columns named in filter, in the table's order;
// an unknown name is an error. An empty filter keeps them all.
func filterColumns(cols []column, filter []string) ([]column, error) {
	if len(cols) == 0 {
		return nil, errors.New("table has no columns")
	}
	if len(filter) == 0 {
		return cols, nil
	}
	var out []column
	for _, c := range cols {
		if slices.Contains(filter, c.Name) {
			out = append(out, c)
		}
	}
	for _, f := range filter {
		if !containsColumn(cols, f) {
			return nil, fmt.Errorf("filter names column %q, which the table does not have", f)
		}
	}
	return out, nil
}

// indexOfColumn finds a column by name, -1 when absent.
func indexOfColumn(cols []column, name string) int {
	return slices.IndexFunc(cols, func(c column) bool { return c.Name == name })
}

func containsColumn(cols []column, name string) bool { return indexOfColumn(cols, name) >= 0 }

// quoteLiteral quotes a value PostgreSQL itself produced (a snapshot id, a
// canonical control value) for a statement that takes no parameters.
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// sameColumns reports whether two column lists match in name, type, order
// and nullability.
func sameColumns(a, b []column) bool { return slices.Equal(a, b) }

// columnList quotes column names for a SELECT or COPY list.
func columnList(cols []column) string {
	names := make([]string, len(cols))
	for i, c := range cols {
		names[i] = ident.Quote(c.Name)
	}
	return strings.Join(names, ", ")
}

// columnDefs renders the column definitions of a CREATE TABLE.
func columnDefs(cols []column) string {
	defs := make([]string, len(cols))
	for i, c := range cols {
		defs[i] = ident.Quote(c.Name) + " " + c.Type
		if c.NotNull {
			defs[i] += " NOT NULL"
		}
	}
	return strings.Join(defs, ", ")
}

// whereClause turns a configured condition into a WHERE clause. Like
// mimeo's, the condition may start with WHERE; it is parenthesized so it
// cannot escape its clause.
func whereClause(condition string) string {
	c := strings.TrimSpace(condition)
	if len(c) >= 6 && strings.EqualFold(c[:5], "where") && (c[5] == ' ' || c[5] == '\t' || c[5] == '\n' || c[5] == '(') {
		c = strings.TrimSpace(c[5:])
	}
	return "WHERE (" + c + ")"
}

// copyOutSQL is the source side of a copy.
func copyOutSQL(t *sourceTable, condition string) string {
	if condition == "" && t.Plain {
		return "COPY " + t.Name.Sanitize() + " (" + columnList(t.Columns) + ") TO STDOUT (FORMAT binary)"
	}
	q := "SELECT " + columnList(t.Columns) + " FROM " + t.Name.Sanitize()
	if condition != "" {
		q += " " + whereClause(condition)
	}
	return "COPY (" + q + ") TO STDOUT (FORMAT binary)"
}

// copyInSQL is the destination side of a copy. FREEZE is allowed because
// the target was created or truncated in the same transaction; it spares
// the table a later rewrite of every page by VACUUM.
func copyInSQL(target ident.Name, cols []column) string {
	return "COPY " + target.Sanitize() + " (" + columnList(cols) + ") FROM STDIN (FORMAT binary, FREEZE)"
}
