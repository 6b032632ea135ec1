package agent

import (
	"strings"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// controlKind is the kind of an incremental table's control column. It
// decides how values are compared, printed and written into SQL. Values
// travel as text in a canonical form PostgreSQL itself produced.
type controlKind string

const (
	kindTimestamptz controlKind = "timestamptz"
	kindTimestamp   controlKind = "timestamp"
	kindSerial      controlKind = "serial"
)

// controlKindOf maps a column's format_type() to its kind.
func controlKindOf(typ string) (controlKind, bool) {
	switch {
	case strings.HasPrefix(typ, "timestamp") && strings.HasSuffix(typ, "with time zone"):
		return kindTimestamptz, true
	case strings.HasPrefix(typ, "timestamp") && strings.HasSuffix(typ, "without time zone"):
		return kindTimestamp, true
	case typ == "bigint" || typ == "integer" || typ == "smallint":
		return kindSerial, true
	}
	return "", false
}

// sqlType is the type values are cast to.
func (k controlKind) sqlType() string {
	switch k {
	case kindTimestamptz:
		return "timestamptz"
	case kindTimestamp:
		return "timestamp"
	default:
		return "bigint"
	}
}

// timed reports whether the boundary is an interval (else an integer).
func (k controlKind) timed() bool { return k != kindSerial }

// text renders expr in the canonical text form: timestamps with
// microseconds (timestamptz in UTC), integers in decimal.
func (k controlKind) text(expr string) string {
	switch k {
	case kindTimestamptz:
		return `to_char((` + expr + `) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US"+00"')`
	case kindTimestamp:
		return `to_char(` + expr + `, 'YYYY-MM-DD HH24:MI:SS.US')`
	default:
		return `(` + expr + `)::text`
	}
}

// literal writes a canonical value into SQL (COPY takes no parameters).
// The value came from PostgreSQL's own output, and is quoted anyway.
func (k controlKind) literal(v string) string {
	return quoteLiteral(v) + "::" + k.sqlType()
}

// upperOp compares the control column with the run's upper bound: time
// bounds exclude themselves (rows at now() - boundary may still come),
// serial bounds (max - boundary) include themselves.
func (k controlKind) upperOp() string {
	if k.timed() {
		return "<"
	}
	return "<="
}

// window is the WHERE clause of rows with control in (lower, upper]
// (upperOp for the run's bound); "" bounds are open.
func window(k controlKind, control, lower, upper, upperOp, condition string) string {
	c := ident.Quote(control)
	parts := []string{c + " IS NOT NULL"}
	if lower != "" {
		parts = append(parts, c+" > "+k.literal(lower))
	}
	if upper != "" {
		parts = append(parts, c+" "+upperOp+" "+k.literal(upper))
	}
	if condition != "" {
		parts = append(parts, strings.TrimPrefix(whereClause(condition), "WHERE "))
	}
	return "WHERE " + strings.Join(parts, " AND ")
}

// describeKind names a control column of kind k in a sentence, such as
// "for an integer control column".
func describeKind(k controlKind) string {
	if k.timed() {
		return "a " + string(k) + " control column"
	}
	return "an integer control column"
}
