package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/triggers"
)

// What a dml or logdel run keeps up to date on the source before it
// replays: source objects of an older layout are upgraded, a partition
// that joined the table's tree gets the triggers (and its rows' keys are
// queued, for what was written to it before), and the destination forgets
// the rows the source lost without a trigger firing (TRUNCATE, a partition
// detached or dropped).

// treeMember is one table of a source table's partition (or inheritance)
// tree, the table itself first.
type treeMember struct {
	Name        ident.Name
	CanTrigger  bool // the replication role may create triggers on it and read it
	HasTriggers bool // it carries this destination's triggers
}

// sqlSourceTree lists the table and every table below it; $2 is the
// trigger function (its triggers are counted), which may not exist yet.
const sqlSourceTree = `
WITH RECURSIVE tree AS (
    SELECT $1::regclass::oid AS rel, 0 AS depth
    UNION ALL
    SELECT i.inhrelid, t.depth + 1 FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.rel
)
SELECT n.nspname, c.relname, has_table_privilege(c.oid, 'TRIGGER') AND has_table_privilege(c.oid, 'SELECT'),
       (SELECT count(*) FROM pg_catalog.pg_trigger g WHERE g.tgrelid = c.oid AND g.tgfoid = to_regprocedure($2)) = 4
FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.rel
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
ORDER BY tree.depth, n.nspname, c.relname`

// sourceTree reads the tree of table on the source.
func sourceTree(ctx context.Context, src *pgxpool.Conn, table ident.Name, function ident.Name) ([]treeMember, error) {
	rows, err := src.Query(ctx, sqlSourceTree, table.Sanitize(), function.Sanitize()+"()")
	if err != nil {
		return nil, fmt.Errorf("list the partitions of %s: %w", table, err)
	}
	tree, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (treeMember, error) {
		var m treeMember
		err := row.Scan(&m.Name.Schema, &m.Name.Table, &m.CanTrigger, &m.HasTriggers)
		return m, err
	})
	if err != nil {
		return nil, fmt.Errorf("list the partitions of %s: %w", table, err)
	}
	return tree, nil
}

func treeNames(tree []treeMember) []ident.Name {
	out := make([]ident.Name, len(tree))
	for i, m := range tree {
		out[i] = m.Name
	}
	return out
}

func treeStrings(tree []treeMember) []string {
	out := make([]string, len(tree))
	for i, m := range tree {
		out[i] = m.Name.String()
	}
	return out
}

// newQueueSpec describes the source objects of this run's table, keyed
// by keys (source columns, with the source's current types); Tables is
// left for the caller, which knows the tree.
func newQueueSpec(ctx context.Context, r *run, typ string, st *sourceTable, keys []string) (triggers.Spec, error) {
	var instance string
	if err := r.dst.QueryRow(ctx, `SELECT id FROM mimeo.instance`).Scan(&instance); err != nil {
		return triggers.Spec{}, fmt.Errorf("read mimeo.instance: %w", err)
	}
	spec := triggers.Spec{Source: st.Name, Logdel: typ == "logdel", Tag: triggers.Tag(instance, r.req.DestTable)}
	for _, k := range keys {
		spec.Keys = append(spec.Keys, triggers.Column{Name: k, Type: st.Columns[indexOfColumn(st.Columns, k)].Type})
	}
	return spec, nil
}

// queueSpec describes a configured table's source objects as they are to
// be: its keys with the source's current types, on every table of tree.
func queueSpec(ctx context.Context, r *run, cfg *queueConfig, st *sourceTable, tree []treeMember) (triggers.Spec, error) {
	spec, err := newQueueSpec(ctx, r, cfg.Type, st, cfg.PkField)
	if err != nil {
		return spec, err
	}
	spec.Tables = treeNames(tree)
	if spec.Names().Queue != cfg.Names.Queue {
		return spec, fmt.Errorf("the source queue %s is not the one this destination would name (%s): was mimeo.instance changed? recreate the table with %s_destroyer and %s_maker",
			cfg.Names.Queue, spec.Names().Queue, cfg.Type, cfg.Type)
	}
	return spec, nil
}

// checkKeyColumns makes sure the key columns are still copied source
// columns: no repull can rebuild a table around a key that is gone.
func checkKeyColumns(typ string, keys []string, st *sourceTable) error {
	for _, k := range keys {
		if !containsColumn(st.Columns, k) {
			return fmt.Errorf("%w: key column %q is no longer a column of %s (dropped, renamed, or left out by p_filter); recreate the table with %s_destroyer and %s_maker",
				ErrColumnsChanged, k, st.Name, typ, typ)
		}
	}
	return nil
}

// syncSourceObjects brings the source objects to the current layout and
// onto every table of the tree, and records them. It reports whether a
// table left the tree since the last run (its rows left the source with no
// trigger firing).
func (a *Agent) syncSourceObjects(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable) (bool, error) {
	if err := checkKeyColumns(cfg.Type, cfg.PkField, st); err != nil {
		return false, err
	}
	tree, err := sourceTree(ctx, src, st.Name, cfg.Names.Function)
	if err != nil {
		return false, err
	}
	// The config says layout 2 once the source has it; a config saying 1
	// is checked against the queue itself (a crash may have come between
	// an upgrade and its record).
	layout, queueCols := cfg.Layout, []string(nil)
	if layout < triggers.Layout {
		if queueCols, err = tableColumnNames(ctx, src, cfg.Names.Queue); err != nil {
			return false, err
		}
		if slices.Contains(queueCols, triggers.ColTruncated) {
			layout = triggers.Layout
		}
	}
	upgrade := layout < triggers.Layout
	if upgrade || slices.ContainsFunc(tree, func(m treeMember) bool { return !m.HasTriggers }) ||
		!slices.Equal(cfg.TriggerTables, treeStrings(tree)) || cfg.Layout < triggers.Layout {
		return a.updateSourceObjects(ctx, r, src, cfg, st, tree, queueCols, upgrade)
	}
	return false, nil
}

// updateSourceObjects does syncSourceObjects' work when there is some:
// upgrade, triggers for new tables of the tree, the record of it all.
func (a *Agent) updateSourceObjects(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable,
	tree []treeMember, queueCols []string, upgrade bool) (bool, error) {
	spec, err := queueSpec(ctx, r, cfg, st, tree)
	if err != nil {
		return false, err
	}
	var stmts []string
	var note string
	if upgrade {
		stmts = spec.UpgradeLayout1(cfg.Names.Function, queueCols)
		note = fmt.Sprintf("upgraded the source objects to layout %d: statement triggers on %s (TRUNCATE too), key columns widened in %s",
			triggers.Layout, strings.Join(treeStrings(tree), ", "), cfg.Names.Queue)
	} else {
		var joined []string
		for _, m := range tree {
			if m.HasTriggers {
				continue
			}
			stmts = append(stmts, spec.Attach(m.Name)...)
			stmts = append(stmts, spec.QueueKeysOf(m.Name))
			joined = append(joined, m.Name.String())
		}
		if len(joined) > 0 {
			note = "put the triggers on " + strings.Join(joined, ", ") + " (new in the partition tree) and queued the keys of its rows"
		}
	}
	if len(stmts) > 0 {
		role, err := checkQueueSchema(ctx, src)
		if err != nil {
			return false, err
		}
		if err := checkTriggerRights(tree, role); err != nil {
			return false, err
		}
		// One transaction: writers wait for its locks, so nothing written
		// to a table before it carries the triggers is missed.
		if err := execSource(ctx, src, append([]string{sqlDDLLockTimeout}, stmts...)); err != nil {
			return false, fmt.Errorf("update the source objects: %w", lockHint(err))
		}
		r.note(ctx, "Update source objects", note, false)
		if upgrade && cfg.Type == "logdel" {
			// Made before logdel destinations were given this index.
			if err := ensureDeletedIndex(ctx, r.dst, r.dest); err != nil {
				return false, err
			}
		}
	}
	current := treeStrings(tree)
	vanished := false
	for _, t := range cfg.TriggerTables {
		if !slices.Contains(current, t) {
			vanished = true
			r.note(ctx, "Partition tree", t+" left the partition tree of "+st.Name.String()+": its rows are gone from the source", true)
		}
	}
	if _, err := r.dst.Exec(ctx, `UPDATE `+typeConfigTable(cfg.Type)+` SET source_layout = $2, triggers = $3, trigger_tables = $4 WHERE dest_table = $1`,
		r.req.DestTable, triggers.Layout, spec.Names().Triggers(), current); err != nil {
		return false, fmt.Errorf("record the source objects: %w", err)
	}
	cfg.Layout, cfg.TriggerTables, cfg.Names = triggers.Layout, current, spec.Names()
	return vanished, nil
}

func tableColumnNames(ctx context.Context, src *pgxpool.Conn, table ident.Name) ([]string, error) {
	rows, err := src.Query(ctx, `
SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum`,
		table.Sanitize())
	if err != nil {
		return nil, fmt.Errorf("read the columns of %s: %w", table, err)
	}
	cols, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("read the columns of %s: %w", table, err)
	}
	return cols, nil
}

// stageKeysName is the staging table of the keys the source has now.
const stageKeysName = "mimeo_stage_keys"

// pruneVanished makes the destination forget the rows the source lost
// without a trigger firing for each: after a TRUNCATE (which queues a
// marker) or when a partition left the tree (vanished). It copies the keys
// the source has now and removes (dml) or marks deleted (logdel, as of the
// first TRUNCATE, else now) every destination row whose key is not among
// them. The markers are claimed before the keys are read, so the copy sees
// what they stand for, and removed only after the destination committed.
// Rows written since are in the queue, and replayed as usual.
func (a *Agent) pruneVanished(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, vanished bool) error {
	q := cfg.Names.Queue.Sanitize()
	token := rand.Int64N(1<<62) + 1
	var markers int64
	var since *time.Time
	err := func() error {
		tx, err := beginWrite(ctx, src)
		if err != nil {
			return err
		}
		defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
		if err := tx.QueryRow(ctx, `WITH m AS (UPDATE `+q+` SET `+ident.Quote(triggers.ColClaimed)+` = $1 WHERE `+
			ident.Quote(triggers.ColTruncated)+` IS NOT NULL RETURNING `+ident.Quote(triggers.ColTruncated)+` AS at)
SELECT count(*), min(at) FROM m`, token).Scan(&markers, &since); err != nil {
			return err
		}
		return tx.Commit(ctx)
	}()
	if err != nil {
		return fmt.Errorf("claim TRUNCATE markers: %w", err)
	}
	if markers == 0 && !vanished {
		return nil
	}
	keys := make([]column, len(cfg.PkField))
	for i, k := range cfg.PkField {
		keys[i] = st.Columns[indexOfColumn(st.Columns, k)]
	}
	stage := ident.Quote(stageKeysName)
	var pruned int64
	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+stage+" ("+columnDefs(keys)+") ON COMMIT DROP"); err != nil {
			return fmt.Errorf("create staging table: %w", err)
		}
		out := "SELECT " + columnList(keys) + " FROM " + st.Name.Sanitize()
		if cfg.Condition != "" {
			out += " " + whereClause(cfg.Condition)
		}
		if _, err := copyRows(ctx, src.Conn().PgConn(), "COPY ("+out+") TO STDOUT (FORMAT binary)",
			tx.Conn().PgConn(), "COPY "+stage+" ("+columnList(keys)+") FROM STDIN (FORMAT binary, FREEZE)"); err != nil {
			return fmt.Errorf("copy the source's keys: %w", err)
		}
		if _, err := tx.Exec(ctx, "ANALYZE "+stage); err != nil {
			return fmt.Errorf("analyze staging table: %w", err)
		}
		d := r.dest.Sanitize()
		missing := "NOT EXISTS (SELECT 1 FROM " + stage + " k WHERE " + keyMatch(cfg.PkField, "d", "k") + ")"
		stmt := "DELETE FROM " + d + " d WHERE " + missing
		var args []any
		if cfg.Type == "logdel" {
			stmt = "UPDATE " + d + " d SET " + ident.Quote(deletedColumn) + " = coalesce($1, clock_timestamp()) WHERE d." +
				ident.Quote(deletedColumn) + " IS NULL AND " + missing
			args = append(args, since)
		}
		tag, err := tx.Exec(ctx, stmt, args...)
		if err != nil {
			return fmt.Errorf("remove rows gone from the source: %w", err)
		}
		pruned = tag.RowsAffected()
		return nil
	})
	if err != nil {
		return fmt.Errorf("apply TRUNCATE: %w", err)
	}
	r.committed += pruned
	why := fmt.Sprintf("%d TRUNCATEs", markers)
	if markers == 1 {
		why = "a TRUNCATE"
	}
	if vanished {
		why = "a partition that left the tree"
		if markers > 0 {
			why += fmt.Sprintf(" and %d TRUNCATEs", markers)
		}
	}
	verb := "removed"
	if cfg.Type == "logdel" {
		verb = "marked deleted"
	}
	r.note(ctx, "Apply TRUNCATE", fmt.Sprintf("%s %d rows the source no longer has, after %s", verb, pruned, why), false)
	if err := execSourceArgs(ctx, src, "DELETE FROM "+q+" WHERE "+ident.Quote(triggers.ColClaimed)+" = $1", token); err != nil {
		return fmt.Errorf("remove applied TRUNCATE markers: %w", err)
	}
	return nil
}
