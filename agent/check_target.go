package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/logical"
	"github.com/mimeo-dev/mimeo/queue"
	"github.com/mimeo-dev/mimeo/validate"
)

// checkTarget is what the checks (validate, validate_rowcount, the column
// and source checks) need to know of a replicated table, whatever its type.
type checkTarget struct {
	Dest      ident.Name
	Type      string
	Dblink    int
	Source    ident.Name
	Filter    []string
	Condition string
	Keys      []string    // pk_field: updater, dml, logdel, logical
	Control   string      // inserter, updater
	Kind      controlKind // of Control
	LastValue *string     // inserter, updater: how far the copy goes
	Logdel    bool        // deleted rows stay, marked (logdel, logical logdel)
	Queue     *ident.Name // dml, logdel: the source queue
	// Columns: the source columns recorded at the last build (nil for
	// logical, whose list is the source's as the stream last saw it, p_filter
	// or not: checks then go by the destination's own columns).
	Columns []string
}

const sqlCheckTargets = `
SELECT c.dest_table, c.type, c.dblink, c.source_table, c.filter, coalesce(c.condition, ''),
       coalesce(u.pk_field, d.pk_field, g.pk_field, l.pk_field),
       coalesce(i.control, u.control, ''), coalesce(i.control_type, u.control_type, ''),
       coalesce(i.last_value, u.last_value),
       c.type = 'logdel' OR coalesce(l.logdel, false),
       coalesce(d.queue_table, g.queue_table),
       coalesce(i.columns, u.columns, d.columns, g.columns)
FROM mimeo.refresh_config c
LEFT JOIN mimeo.refresh_config_inserter i ON i.dest_table = c.dest_table AND c.type = 'inserter'
LEFT JOIN mimeo.refresh_config_updater u ON u.dest_table = c.dest_table AND c.type = 'updater'
LEFT JOIN mimeo.refresh_config_dml d ON d.dest_table = c.dest_table AND c.type = 'dml'
LEFT JOIN mimeo.refresh_config_logdel g ON g.dest_table = c.dest_table AND c.type = 'logdel'
LEFT JOIN mimeo.refresh_config_logical l ON l.dest_table = c.dest_table AND c.type = 'logical'
WHERE $1::text IS NULL OR c.dest_table = $1
ORDER BY c.dblink, c.dest_table`

// loadCheckTargets reads the config of dest, or of every replicated table
// when dest is "".
func loadCheckTargets(ctx context.Context, q queue.DB, dest string) ([]*checkTarget, error) {
	rows, err := q.Query(ctx, sqlCheckTargets, nullString(dest))
	if err != nil {
		return nil, fmt.Errorf("read the replicated tables: %w", err)
	}
	targets, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*checkTarget, error) {
		var t checkTarget
		var dest, src, kind string
		var queueTable *string
		if err := row.Scan(&dest, &t.Type, &t.Dblink, &src, &t.Filter, &t.Condition, &t.Keys, &t.Control, &kind,
			&t.LastValue, &t.Logdel, &queueTable, &t.Columns); err != nil {
			return nil, err
		}
		var err error
		if t.Dest, err = ident.Parse(dest); err != nil {
			return nil, fmt.Errorf("dest_table %q: %w", dest, err)
		}
		if t.Source, err = ident.Parse(src); err != nil {
			return nil, fmt.Errorf("source_table of %s: %w", dest, err)
		}
		if queueTable != nil {
			q, err := ident.Parse(*queueTable)
			if err != nil {
				return nil, fmt.Errorf("queue_table of %s: %w", dest, err)
			}
			t.Queue = &q
		}
		t.Kind = controlKind(kind)
		return &t, nil
	})
	if err != nil {
		return nil, fmt.Errorf("read the replicated tables: %w", err)
	}
	if dest != "" && len(targets) == 0 {
		return nil, fmt.Errorf("%s: %w", dest, ErrNotConfigured)
	}
	return targets, nil
}

// ownColumns are the destination's columns that are mimeo's, not the
// source's.
func (t *checkTarget) ownColumns() []string {
	switch {
	case t.Type == "logdel":
		return []string{deletedColumn}
	case t.Logdel:
		return []string{logical.DeletedColumn}
	}
	return nil
}

// deletedColumn is the column that marks a deleted row ("" for none).
func (t *checkTarget) deletedColumn() string {
	if own := t.ownColumns(); len(own) > 0 {
		return own[0]
	}
	return ""
}

// condition is the configured condition as SQL ("" for none).
func (t *checkTarget) condition() string {
	if t.Condition == "" {
		return ""
	}
	return strings.TrimPrefix(whereClause(t.Condition), "WHERE ")
}

// sourceWhere is which source rows the copy holds: the condition, and for
// inserter and updater only up to last_value.
func (t *checkTarget) sourceWhere() string {
	var conds []string
	if c := t.condition(); c != "" {
		conds = append(conds, c)
	}
	if t.Control != "" {
		if t.LastValue == nil {
			conds = append(conds, "false") // nothing copied yet
		} else {
			conds = append(conds, ident.Quote(t.Control)+" <= "+t.Kind.literal(*t.LastValue))
		}
	}
	return strings.Join(conds, " AND ")
}

// pastLastValue is "the row changed after the copy's last_value"
// (inserter, updater with a last_value).
func (t *checkTarget) pastLastValue() string {
	return ident.Quote(t.Control) + " > " + t.Kind.literal(*t.LastValue)
}

// destWhere is which destination rows stand for source rows: for logdel
// the live ones.
func (t *checkTarget) destWhere() string {
	if c := t.deletedColumn(); c != "" {
		return ident.Quote(c) + " IS NULL"
	}
	return ""
}

// uniqueKey is what identifies a row: the replication key, else the
// source's primary key or first unique index (nil for none).
func (t *checkTarget) uniqueKey(st *sourceTable) []validate.Column {
	names := t.Keys
	if len(names) == 0 {
		names = sourceUniqueKey(st)
	}
	return keyColumns(st, names)
}

// sourceUniqueKey is the source's primary key or first unique index on
// plain columns that are all copied.
func sourceUniqueKey(st *sourceTable) []string {
	for _, ix := range st.Indexes {
		if (ix.Primary || ix.Unique) && !ix.HasExpr && len(ix.Columns) > 0 &&
			!slices.ContainsFunc(ix.Columns, func(c string) bool { return !containsColumn(st.Columns, c) }) {
			return ix.Columns
		}
	}
	return nil
}

// keyColumns gives names their source types; nil if one is not copied.
func keyColumns(st *sourceTable, names []string) []validate.Column {
	var key []validate.Column
	for _, n := range names {
		i := indexOfColumn(st.Columns, n)
		if i < 0 {
			return nil
		}
		key = append(key, validate.Column{Name: n, Type: st.Columns[i].Type})
	}
	return key
}

// chunkKey picks the columns that order the rows into chunks: the
// replication key, the control column of an inserter, or the source's
// primary key or first unique index for snap and table. Nil means one
// chunk for the whole table.
func (t *checkTarget) chunkKey(st *sourceTable) []validate.Column {
	var names []string
	switch {
	case len(t.Keys) > 0:
		names = t.Keys
	case t.Type == "inserter":
		names = []string{t.Control}
	default:
		names = sourceUniqueKey(st)
	}
	return keyColumns(st, names)
}

// validateColumns turns source columns into the package validate's.
func validateColumns(cols []column) []validate.Column {
	out := make([]validate.Column, len(cols))
	for i, c := range cols {
		out[i] = validate.Column{Name: c.Name, Type: c.Type}
	}
	return out
}
