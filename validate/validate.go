// Package validate compares a replicated table's source and destination
// without shipping the table: the source cuts its rows into key ranges
// (chunks), both sides sum a checksum of each chunk's rows, and only the
// chunks whose sums differ are looked at again, or re-pulled.
//
// Both sides must render values the same way for their checksums to agree:
// Settings fixes the session settings that shape text output, and the
// caller runs each side in one transaction with them.
package validate

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// Querier is a connection or a transaction.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// DefaultChunkRows is how many source rows a chunk holds unless told.
const DefaultChunkRows = 10000

// Settings are the SET LOCAL statements that make text output the same on
// both sides (a time zone, date and interval styles, exact floats, hex
// bytea), whatever the servers' defaults.
var Settings = []string{
	"SET LOCAL TimeZone = 'UTC'",
	"SET LOCAL DateStyle = 'ISO, YMD'",
	"SET LOCAL IntervalStyle = 'postgres'",
	"SET LOCAL extra_float_digits = 3",
	"SET LOCAL bytea_output = 'hex'",
}

// Column is a column's name and SQL type (as format_type renders it).
type Column struct {
	Name string
	Type string
}

// Spec says what is compared: the same columns on both sides, rows ordered
// into chunks by Key. Key should lead an index on both sides (each chunk is
// a range scan); with no key the whole table is one chunk.
type Spec struct {
	Columns   []Column
	Key       []Column
	ChunkRows int
}

// Side is one side's table and which of its rows count: Where is an SQL
// condition ("" for every row) built by the caller, with literals only.
type Side struct {
	Table ident.Name
	Where string
}

// Chunk is one key range: keys from Lower (inclusive; nil: from the first)
// up to Upper (exclusive; nil: to the last), as text in key column order.
type Chunk struct {
	Lower, Upper []string
}

// Sum is what one side holds in one chunk: its row count and the sum of
// its rows' 64-bit checksums (a decimal string).
type Sum struct {
	Rows int64
	Hash string
}

// Plan cuts the source's rows into chunks of spec.ChunkRows in key order.
// With no key, or fewer rows than a chunk, there is one chunk.
func Plan(ctx context.Context, q Querier, spec Spec, src Side) ([]Chunk, error) {
	if len(spec.Key) == 0 {
		return []Chunk{{}}, nil
	}
	size := spec.ChunkRows
	if size <= 0 {
		size = DefaultChunkRows
	}
	keys := strings.Join(quotedKeys(spec.Key), ", ")
	sql := fmt.Sprintf(`SELECT %s FROM (SELECT %s, row_number() OVER (ORDER BY %s) AS mimeo_rn FROM %s%s) s
WHERE mimeo_rn %% $1 = 1 AND mimeo_rn > 1 ORDER BY mimeo_rn`,
		strings.Join(textKeys(spec.Key), ", "), keys, keys, src.Table.Sanitize(), where(src.Where))
	rows, err := q.Query(ctx, sql, size)
	if err != nil {
		return nil, fmt.Errorf("cut %s into chunks: %w", src.Table, err)
	}
	cuts, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) ([]string, error) {
		vals, err := scanTexts(row, len(spec.Key))
		if err != nil {
			return nil, err
		}
		out := make([]string, len(vals))
		for i, v := range vals {
			if v == nil {
				return nil, fmt.Errorf("key column %s is NULL in a row of %s", spec.Key[i].Name, src.Table)
			}
			out[i] = *v
		}
		return out, nil
	})
	if err != nil {
		return nil, fmt.Errorf("cut %s into chunks: %w", src.Table, err)
	}
	chunks := make([]Chunk, len(cuts)+1)
	for i, c := range cuts {
		chunks[i].Upper = c
		chunks[i+1].Lower = c
	}
	return chunks, nil
}

// hashExpr is a row's 64-bit checksum: the first 16 hex digits of the md5
// of its text form, as a bigint. md5 and record output are the same on
// every server version and platform.
func hashExpr(cols []Column) string {
	names := make([]string, len(cols))
	for i, c := range cols {
		names[i] = ident.Quote(c.Name)
	}
	return "('x' || left(md5(ROW(" + strings.Join(names, ", ") + ")::text), 16))::bit(64)::bigint"
}

// Sums returns, for each chunk, what side holds in it, leaving out the
// rows whose key is among exclude (key values as text, in key order).
func Sums(ctx context.Context, q Querier, spec Spec, side Side, chunks []Chunk, exclude [][]string) ([]Sum, error) {
	sums := make([]Sum, len(chunks))
	if len(chunks) == 0 {
		return sums, nil
	}
	sql, args := sumsSQL(spec, side, chunks, exclude)
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("checksum the chunks of %s: %w", side.Table, err)
	}
	defer rows.Close()
	for rows.Next() {
		var i int
		var s Sum
		if err := rows.Scan(&i, &s.Rows, &s.Hash); err != nil {
			return nil, fmt.Errorf("checksum the chunks of %s: %w", side.Table, err)
		}
		sums[i] = s
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("checksum the chunks of %s: %w", side.Table, err)
	}
	return sums, nil
}

// sumsSQL builds Sums' query: chunks with both bounds in one lateral join
// over arrays of bounds (one index range scan each), the first and last
// chunk (one bound open) and a whole-table chunk each in a part of its own.
func sumsSQL(spec Spec, side Side, chunks []Chunk, exclude [][]string) (string, []any) {
	var args []any
	param := func(v any) string {
		args = append(args, v)
		return fmt.Sprintf("$%d", len(args))
	}
	keys := "(" + strings.Join(quotedKeys(spec.Key), ", ") + ")"
	typed := func(vals []string) string { // a row of literal key values
		out := make([]string, len(vals))
		for i, v := range vals {
			out[i] = param(v) + "::text::" + spec.Key[i].Type
		}
		return "(" + strings.Join(out, ", ") + ")"
	}
	conds := []string{}
	if side.Where != "" {
		conds = append(conds, "("+side.Where+")")
	}
	if len(exclude) > 0 {
		var ex string
		ex, args = excludeCondition(spec, exclude, args)
		conds = append(conds, ex)
	}
	hash := hashExpr(spec.Columns)
	from := side.Table.Sanitize()
	part := func(index int, bounds ...string) string {
		c := append(append([]string{}, bounds...), conds...)
		w := ""
		if len(c) > 0 {
			w = " WHERE " + strings.Join(c, " AND ")
		}
		return fmt.Sprintf("SELECT %d, count(*), coalesce(sum(%s), 0)::text FROM %s%s", index, hash, from, w)
	}
	var parts []string
	var middle []int
	for i, c := range chunks {
		switch {
		case c.Lower == nil && c.Upper == nil:
			parts = append(parts, part(i))
		case c.Lower == nil:
			parts = append(parts, part(i, keys+" < "+typed(c.Upper)))
		case c.Upper == nil:
			parts = append(parts, part(i, keys+" >= "+typed(c.Lower)))
		default:
			middle = append(middle, i)
		}
	}
	if len(middle) > 0 {
		n := len(spec.Key)
		lower, upper := make([][]string, n), make([][]string, n)
		for _, i := range middle {
			for k := 0; k < n; k++ {
				lower[k] = append(lower[k], chunks[i].Lower[k])
				upper[k] = append(upper[k], chunks[i].Upper[k])
			}
		}
		arrays := []string{param(middle) + "::int[]"}
		names := []string{"i"}
		lo, hi := make([]string, n), make([]string, n)
		for k := 0; k < n; k++ {
			arrays = append(arrays, param(lower[k])+"::text[]", param(upper[k])+"::text[]")
			names = append(names, fmt.Sprintf("l%d", k), fmt.Sprintf("u%d", k))
			lo[k] = fmt.Sprintf("b.l%d::%s", k, spec.Key[k].Type)
			hi[k] = fmt.Sprintf("b.u%d::%s", k, spec.Key[k].Type)
		}
		c := append([]string{keys + " >= (" + strings.Join(lo, ", ") + ")", keys + " < (" + strings.Join(hi, ", ") + ")"}, conds...)
		parts = append(parts, fmt.Sprintf(`SELECT b.i, s.n, s.h FROM unnest(%s) AS b(%s)
CROSS JOIN LATERAL (SELECT count(*) AS n, coalesce(sum(%s), 0)::text AS h FROM %s WHERE %s) s`,
			strings.Join(arrays, ", "), strings.Join(names, ", "), hash, from, strings.Join(c, " AND ")))
	}
	return strings.Join(parts, "\nUNION ALL\n"), args
}

// RangeCondition is chunk c's key range as an SQL condition with literal
// values, for statements that take no parameters (COPY); alias qualifies
// the key columns when not empty.
func RangeCondition(spec Spec, c Chunk, alias string) string {
	cols := quotedKeys(spec.Key)
	if alias != "" {
		for i := range cols {
			cols[i] = ident.Quote(alias) + "." + cols[i]
		}
	}
	keys := "(" + strings.Join(cols, ", ") + ")"
	literal := func(vals []string) string {
		out := make([]string, len(vals))
		for i, v := range vals {
			out[i] = "'" + strings.ReplaceAll(v, "'", "''") + "'::" + spec.Key[i].Type
		}
		return "(" + strings.Join(out, ", ") + ")"
	}
	var conds []string
	if c.Lower != nil {
		conds = append(conds, keys+" >= "+literal(c.Lower))
	}
	if c.Upper != nil {
		conds = append(conds, keys+" < "+literal(c.Upper))
	}
	if len(conds) == 0 {
		return "true"
	}
	return strings.Join(conds, " AND ")
}

// textKeys selects each column as text.
func textKeys(cols []Column) []string {
	out := quotedKeys(cols)
	for i := range out {
		out[i] += "::text"
	}
	return out
}

// scanTexts scans a row's first n columns as text (nil for NULL), and the
// rest into extra.
func scanTexts(row interface{ Scan(...any) error }, n int, extra ...any) ([]*string, error) {
	vals := make([]*string, n)
	dest := make([]any, 0, n+len(extra))
	for i := range vals {
		dest = append(dest, &vals[i])
	}
	return vals, row.Scan(append(dest, extra...)...)
}

func quotedKeys(key []Column) []string {
	out := make([]string, len(key))
	for i, k := range key {
		out[i] = ident.Quote(k.Name)
	}
	return out
}

func where(cond string) string {
	if cond == "" {
		return ""
	}
	return " WHERE (" + cond + ")"
}

// RowHash is one row of a chunk: its key values as text (in key order)
// and its checksum.
type RowHash struct {
	Key  []string
	Hash int64
}

// Rows lists, for each row side holds in chunk c, the values of the
// match columns (which identify a row: a unique key) and its checksum,
// leaving out the rows whose chunk key is among exclude: for a closer look
// at a chunk that differs (a chunk is small: ChunkRows rows).
func Rows(ctx context.Context, q Querier, spec Spec, side Side, c Chunk, exclude [][]string, match []Column) ([]RowHash, error) {
	keys := textKeys(match)
	conds := []string{RangeCondition(spec, c, "")}
	if side.Where != "" {
		conds = append(conds, "("+side.Where+")")
	}
	var args []any
	if len(exclude) > 0 {
		var ex string
		ex, args = excludeCondition(spec, exclude, nil)
		conds = append(conds, ex)
	}
	sql := "SELECT " + strings.Join(append(keys, hashExpr(spec.Columns)), ", ") + " FROM " + side.Table.Sanitize() +
		" WHERE " + strings.Join(conds, " AND ")
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("list the rows of a chunk of %s: %w", side.Table, err)
	}
	defer rows.Close()
	var out []RowHash
	for rows.Next() {
		var h int64
		vals, err := scanTexts(rows, len(match), &h)
		if err != nil {
			return nil, fmt.Errorf("list the rows of a chunk of %s: %w", side.Table, err)
		}
		r := RowHash{Hash: h, Key: make([]string, len(vals))}
		for i, v := range vals {
			if v != nil {
				r.Key[i] = *v
			}
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list the rows of a chunk of %s: %w", side.Table, err)
	}
	return out, nil
}

// excludeCondition is "the row's key is not among exclude", its arrays
// appended to args as parameters.
func excludeCondition(spec Spec, exclude [][]string, args []any) (string, []any) {
	keys := "(" + strings.Join(quotedKeys(spec.Key), ", ") + ")"
	cols := make([][]string, len(spec.Key))
	for _, k := range exclude {
		for i := range spec.Key {
			cols[i] = append(cols[i], k[i])
		}
	}
	arrays, names, match := make([]string, len(spec.Key)), make([]string, len(spec.Key)), make([]string, len(spec.Key))
	for i, k := range spec.Key {
		args = append(args, cols[i])
		arrays[i] = fmt.Sprintf("$%d::text[]", len(args))
		names[i] = fmt.Sprintf("e%d", i)
		match[i] = fmt.Sprintf("e.e%d::%s", i, k.Type)
	}
	return fmt.Sprintf("NOT EXISTS (SELECT 1 FROM unnest(%s) AS e(%s) WHERE %s = (%s))",
		strings.Join(arrays, ", "), strings.Join(names, ", "), keys, strings.Join(match, ", ")), args
}

// Keys lists the distinct chunk keys in chunk c of table that meet where
// ("" for all), at most limit of them: the keys of changes not applied
// yet, say, read from a source queue that holds the same key columns.
func Keys(ctx context.Context, q Querier, spec Spec, table ident.Name, c Chunk, where string, limit int) ([][]string, error) {
	conds := []string{RangeCondition(spec, c, "")}
	for _, k := range quotedKeys(spec.Key) {
		conds = append(conds, k+" IS NOT NULL")
	}
	if where != "" {
		conds = append(conds, "("+where+")")
	}
	rows, err := q.Query(ctx, "SELECT DISTINCT "+strings.Join(textKeys(spec.Key), ", ")+" FROM "+table.Sanitize()+
		" WHERE "+strings.Join(conds, " AND ")+" LIMIT $1", limit)
	if err != nil {
		return nil, fmt.Errorf("list the keys of a chunk of %s: %w", table, err)
	}
	keys, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) ([]string, error) {
		vals, err := scanTexts(row, len(spec.Key))
		if err != nil {
			return nil, err
		}
		out := make([]string, len(vals))
		for i, v := range vals {
			out[i] = *v // NOT NULL above
		}
		return out, nil
	})
	if err != nil {
		return nil, fmt.Errorf("list the keys of a chunk of %s: %w", table, err)
	}
	return keys, nil
}
