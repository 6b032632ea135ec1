package logical

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// DeletedColumn marks, in a logdel flavoured table, when the source
// deleted the row.
const DeletedColumn = "mimeo_source_deleted"

// tableConfig is one logical table's config row as the stream reads it.
type tableConfig struct {
	dest      ident.Name
	destText  string
	source    ident.Name
	state     string
	startLSN  pglogrepl.LSN
	keys      []string
	filter    []string
	condition string
	logdel    bool
	columns   []string
	types     []string
	destOID   uint32
}

// shape is what a plan depends on: a config whose shape is unchanged
// keeps its plan.
func (c *tableConfig) shape() string {
	return fmt.Sprint(c.destOID, c.keys, c.filter, c.condition, c.logdel, c.columns, c.types)
}

const sqlTargets = `
SELECT dest_table, state, coalesce(start_lsn, '0/0')::text, pk_field, coalesce(filter, '{}'), coalesce(condition, ''),
       logdel, coalesce(columns, '{}'), coalesce(column_types, '{}'), coalesce(to_regclass(dest_table)::oid, 0)
FROM ONLY mimeo.refresh_config_logical
WHERE dblink = $1 AND source_table IN ($4, format('%I.%I', $2::text, $3::text))
ORDER BY dest_table
FOR SHARE`

// readTargets reads, and locks for the transaction, the configs of the
// destination tables copied from source table src: makers and repulls
// change a table's state under a row lock, so the stream sees each state
// change between two of its transactions, never inside one.
func readTargets(ctx context.Context, tx pgx.Tx, dblink int, src ident.Name) ([]*tableConfig, error) {
	// The maker records the name as ident.Name.String() does, which does
	// not quote keywords ("some") as format's %I does: either matches.
	rows, err := tx.Query(ctx, sqlTargets, dblink, src.Schema, src.Table, src.String())
	if err != nil {
		return nil, fmt.Errorf("read config of %s's tables: %w", src, err)
	}
	defer rows.Close()
	var out []*tableConfig
	for rows.Next() {
		c := &tableConfig{source: src}
		var start string
		if err := rows.Scan(&c.destText, &c.state, &start, &c.keys, &c.filter, &c.condition, &c.logdel, &c.columns, &c.types, &c.destOID); err != nil {
			return nil, err
		}
		if c.dest, err = ident.Parse(c.destText); err != nil {
			return nil, err
		}
		if c.startLSN, err = pglogrepl.ParseLSN(start); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// planCol is a destination column and where its value is in the tuple.
type planCol struct {
	name string
	typ  string
	src  int
}

// plan is how one destination table takes the changes of one relation.
type plan struct {
	cfg      *tableConfig
	rel      *relation
	cols     []planCol // destination columns fed from the relation
	keys     []planCol
	relTypes []string // every relation column's type, for the condition
	src      DB       // the source, for rows an update brings into the condition
	stages   *stages  // the stream's staging tables (nil: arrays only)
	// deferred names the table's DEFERRABLE unique constraints: checked at
	// the end of each batch, as a batch is applied set-based, not in the
	// source's row order.
	deferred string
}

// tableError is an apply failure that belongs to one table: that table is
// marked failed and the others go on.
type tableError struct {
	dest string
	err  error
}

func (e *tableError) Error() string { return e.dest + ": " + e.err.Error() }
func (e *tableError) Unwrap() error { return e.err }

// RepullHint ends the message of a table that needs a repull.
func RepullHint(dest string) string {
	return "; run SELECT mimeo.refresh_logical(" + quoteLit(dest) + ", p_repull => true) to copy it again"
}

// droppedColumn says that the source no longer has a column the copy has.
func droppedColumn(name string) string {
	return fmt.Sprintf("column %s was dropped or renamed on the source", ident.Display(name))
}

// filledColumns says that columns were added on the source with values
// for its existing rows, which the stream does not carry.
func filledColumns(names []string) string {
	shown := make([]string, len(names))
	for i, n := range names {
		shown[i] = ident.Display(n)
	}
	return fmt.Sprintf("column %s was added on the source with a default or NOT NULL, so its existing rows have values the stream does not carry",
		strings.Join(shown, ", "))
}

// MarkFailed marks a ready or copied logical table failed, with why: it
// gets no changes until a repull.
func MarkFailed(ctx context.Context, dst DB, dest, why string) error {
	_, err := dst.Exec(ctx, `UPDATE ONLY mimeo.refresh_config_logical SET state = 'failed', state_detail = $2
WHERE dest_table = $1 AND state IN ('ready', 'copied')`, dest, why)
	return err
}

// buildPlan checks rel against the columns the table was made with and
// maps the destination's columns onto it. A source column added without a
// default is added to the destination (unless p_filter names the columns);
// a column dropped, renamed or retyped that the destination copies fails
// the table.
func buildPlan(ctx context.Context, tx pgx.Tx, src DB, cfg *tableConfig, rel *relation, relTypes []string) (*plan, error) {
	fail := func(format string, args ...any) error {
		return &tableError{dest: cfg.destText, err: fmt.Errorf(format+RepullHint(cfg.destText), args...)}
	}
	if cfg.destOID == 0 {
		return nil, fail("destination table %s is missing", cfg.dest)
	}
	destCols, err := destColumns(ctx, tx, cfg.destOID)
	if err != nil {
		return nil, err
	}
	has := map[string]bool{}
	for _, c := range destCols {
		has[c.name] = true
	}
	var problems, toAdd []string
	changed := false
	for i, name := range cfg.columns {
		j := rel.columnIndex(name)
		if j < 0 {
			changed = true
			if has[name] {
				problems = append(problems, droppedColumn(name))
			}
			continue
		}
		if i < len(cfg.types) && relTypes[j] != cfg.types[i] {
			changed = true
			if has[name] {
				problems = append(problems, fmt.Sprintf("column %s changed type from %s to %s on the source", ident.Display(name), cfg.types[i], relTypes[j]))
			}
		}
	}
	for _, c := range rel.columns {
		if !slices.Contains(cfg.columns, c.name) {
			changed = true
			if len(cfg.filter) == 0 && !has[c.name] {
				toAdd = append(toAdd, c.name)
			}
		}
	}
	if len(problems) > 0 {
		return nil, fail("%s", strings.Join(problems, "; "))
	}
	if len(toAdd) > 0 {
		var unsafe []string
		rows, err := src.Query(ctx, `SELECT a.attname FROM pg_catalog.pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attname = ANY($2) AND (a.attnotnull OR a.atthasdef OR a.atthasmissing)`, cfg.source.Sanitize(), toAdd)
		if err != nil {
			return nil, fmt.Errorf("read added columns of %s: %w", cfg.source, err)
		}
		if unsafe, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return nil, err
		}
		if len(unsafe) > 0 {
			return nil, fail("%s", filledColumns(unsafe))
		}
		for _, name := range toAdd {
			j := rel.columnIndex(name)
			if _, err := tx.Exec(ctx, "ALTER TABLE "+cfg.dest.Sanitize()+" ADD COLUMN "+ident.Quote(name)+" "+relTypes[j]); err != nil {
				return nil, &tableError{dest: cfg.destText, err: fmt.Errorf("add column %s, added on the source: %w", ident.Display(name), err)}
			}
		}
		if destCols, err = destColumns(ctx, tx, cfg.destOID); err != nil {
			return nil, err
		}
	}
	if changed {
		names := make([]string, len(rel.columns))
		for i, c := range rel.columns {
			names[i] = c.name
		}
		if _, err := tx.Exec(ctx, `UPDATE ONLY mimeo.refresh_config_logical SET columns = $2, column_types = $3 WHERE dest_table = $1`,
			cfg.destText, names, relTypes); err != nil {
			return nil, fmt.Errorf("record source columns of %s: %w", cfg.dest, err)
		}
		cfg.columns, cfg.types = names, slices.Clone(relTypes)
	}
	p := &plan{cfg: cfg, rel: rel, relTypes: relTypes, src: src}
	if err := tx.QueryRow(ctx, `SELECT coalesce(string_agg(quote_ident(n.nspname) || '.' || quote_ident(c.conname), ', '), '')
FROM pg_catalog.pg_constraint c JOIN pg_catalog.pg_namespace n ON n.oid = c.connamespace
WHERE c.conrelid = $1 AND c.contype = 'u' AND c.condeferrable`, cfg.destOID).Scan(&p.deferred); err != nil {
		return nil, fmt.Errorf("read deferrable constraints of %s: %w", cfg.dest, err)
	}
	for _, c := range destCols {
		if cfg.logdel && c.name == DeletedColumn {
			continue
		}
		j := rel.columnIndex(c.name)
		if j < 0 {
			return nil, fail("destination column %s has no source column", ident.Display(c.name))
		}
		p.cols = append(p.cols, planCol{name: c.name, typ: c.typ, src: j})
	}
	for _, k := range cfg.keys {
		i := slices.IndexFunc(p.cols, func(c planCol) bool { return c.name == k })
		if i < 0 {
			return nil, fail("key column %s is not a column of the destination", ident.Display(k))
		}
		if !rel.columns[p.cols[i].src].key {
			return nil, fail("key column %s is no longer part of the source's replica identity, so deletes and key changes cannot be matched", ident.Display(k))
		}
		p.keys = append(p.keys, p.cols[i])
	}
	return p, nil
}

// destColumns reads a destination table's columns.
func destColumns(ctx context.Context, db DB, oid uint32) ([]planCol, error) {
	rows, err := db.Query(ctx, `SELECT attname, format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute
WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, oid)
	if err != nil {
		return nil, fmt.Errorf("read destination columns: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (planCol, error) {
		var c planCol
		err := r.Scan(&c.name, &c.typ)
		return c, err
	})
}

// relationTypes names the types of a relation's columns, as the source's
// format_type prints them.
func relationTypes(ctx context.Context, src DB, rel *relation) ([]string, error) {
	oids := make([]uint32, len(rel.columns))
	mods := make([]int32, len(rel.columns))
	for i, c := range rel.columns {
		oids[i], mods[i] = c.typeID, c.typmod
	}
	rows, err := src.Query(ctx, `SELECT format_type(o, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(o, m, n) ORDER BY n`, oids, mods)
	if err != nil {
		return nil, fmt.Errorf("read column types of %s.%s: %w", rel.schema, rel.table, err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// describeRelation reads a source table as pgoutput would describe it
// (generated columns are not published; key marks the replica identity).
func describeRelation(ctx context.Context, src DB, name ident.Name) (*relation, error) {
	rows, err := src.Query(ctx, `
SELECT a.attname, a.atttypid, a.atttypmod,
       CASE c.relreplident
           WHEN 'f' THEN true
           WHEN 'd' THEN coalesce(a.attnum = ANY ((SELECT i.indkey FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)::int2[]), false)
           WHEN 'i' THEN coalesce(a.attnum = ANY ((SELECT i.indkey FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)::int2[]), false)
           ELSE false END
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
WHERE c.oid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum`, name.Sanitize())
	if err != nil {
		return nil, fmt.Errorf("describe %s: %w", name, err)
	}
	cols, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (relColumn, error) {
		var c relColumn
		err := r.Scan(&c.name, &c.typeID, &c.typmod, &c.key)
		return c, err
	})
	if err != nil {
		return nil, fmt.Errorf("describe %s: %w", name, err)
	}
	if len(cols) == 0 {
		return nil, fmt.Errorf("source table %s does not exist", name)
	}
	return &relation{schema: name.Schema, table: name.Table, columns: cols}, nil
}

// SourceColumns returns the source table's published columns and their
// types, as the maker records them for later comparison.
func SourceColumns(ctx context.Context, src DB, name ident.Name) ([]string, []string, error) {
	rel, err := describeRelation(ctx, src, name)
	if err != nil {
		return nil, nil, err
	}
	types, err := relationTypes(ctx, src, rel)
	if err != nil {
		return nil, nil, err
	}
	names := make([]string, len(rel.columns))
	for i, c := range rel.columns {
		names[i] = c.name
	}
	return names, types, nil
}

// ReplicaIdentity returns the columns of the source table's replica
// identity: nil with full true for REPLICA IDENTITY FULL; an error saying
// what to do when it has none (pgoutput could not say which row an UPDATE
// or DELETE changed, and publishing it would make the source's own
// UPDATEs and DELETEs fail).
func ReplicaIdentity(ctx context.Context, src DB, name ident.Name) (cols []string, full bool, err error) {
	var ident_ string
	var key []string
	err = src.QueryRow(ctx, `
SELECT c.relreplident::text,
       coalesce(array(SELECT a.attname FROM pg_catalog.pg_index i
                      CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                      WHERE i.indrelid = c.oid AND CASE c.relreplident WHEN 'd' THEN i.indisprimary ELSE i.indisreplident END
                      ORDER BY k.ord), '{}')
FROM pg_catalog.pg_class c WHERE c.oid = to_regclass($1)`, name.Sanitize()).Scan(&ident_, &key)
	if err != nil {
		return nil, false, fmt.Errorf("read replica identity of %s: %w", name, err)
	}
	switch {
	case ident_ == "f":
		return nil, true, nil
	case ident_ == "n" || len(key) == 0:
		return nil, false, fmt.Errorf("source table %s has no primary key or replica identity index, so its updates and deletes cannot be streamed (and publishing it would make them fail on the source); add a primary key, or on the source run ALTER TABLE %s REPLICA IDENTITY USING INDEX <a unique index on NOT NULL columns>",
			name, name.Sanitize())
	}
	return key, false, nil
}
