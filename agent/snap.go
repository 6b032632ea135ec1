package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/queue"
)

// Snap replication: the destination name is a view over one of two tables,
// <t>_snap1 and <t>_snap2. A refresh rebuilds the idle one from the source
// and points the view at it, all in one transaction: readers see the old
// copy until the commit and the new one after, never a partial table.

// snapConfig is a row of mimeo.refresh_config_snap.
type snapConfig struct {
	Source     string
	Dblink     int
	Filter     []string
	Condition  *string
	Stats      *tableStats
	Filenode   *int64
	CopiedWith *string // copiedWith() of the filter and condition of the last copy
	PostScript []string
	Indexes    bool
}

// copiedWith fingerprints what a copy selected, so that a changed filter or
// condition is never mistaken for "nothing changed".
func copiedWith(filter []string, condition string) string {
	sum := sha256.Sum256([]byte(strings.Join(filter, "\x00") + "\x01" + condition))
	return hex.EncodeToString(sum[:8])
}

// unchanged reports whether the source is provably as it was at the last
// copy: same columns, write counters, file node and selection.
func (c *snapConfig) unchanged(st *sourceTable, sameCols bool, with string) bool {
	return sameCols && c.Stats != nil && st.Stats != nil && *c.Stats == *st.Stats &&
		c.Filenode != nil && st.Filenode != nil && *c.Filenode == *st.Filenode &&
		c.CopiedWith != nil && *c.CopiedWith == with
}

const (
	sqlSnapConfig = `
SELECT source_table, dblink, filter, condition, n_tup_ins, n_tup_upd, n_tup_del, source_filenode, copied_with,
       post_script, create_indexes
FROM mimeo.refresh_config_snap WHERE dest_table = $1`

	sqlSnapInsertConfig = `
INSERT INTO mimeo.refresh_config_snap
    (dest_table, type, dblink, source_table, filter, condition, post_script, create_indexes,
     n_tup_ins, n_tup_upd, n_tup_del, last_run, source_filenode, copied_with)
VALUES ($1, 'snap', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`

	sqlSnapUpdateConfig = `
UPDATE mimeo.refresh_config_snap
SET n_tup_ins = $2, n_tup_upd = $3, n_tup_del = $4, last_run = $5, source_filenode = $6, copied_with = $7
WHERE dest_table = $1`

	sqlDeleteConfig = `DELETE FROM mimeo.refresh_config WHERE dest_table = $1`

	// A run's start time, on whichever child table holds the config row
	// (an UPDATE of the parent reaches the children).
	sqlRecordRun = `UPDATE mimeo.refresh_config SET last_run = $2 WHERE dest_table = $1`

	// The table a view reads from, found through the view's rewrite rule.
	sqlViewSource = `
SELECT c.relname FROM pg_catalog.pg_rewrite r
JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> r.ev_class
JOIN pg_catalog.pg_class c ON c.oid = d.refobjid AND c.relkind = 'r'
WHERE r.ev_class = to_regclass($1)
LIMIT 1`
)

// makerArgs are the arguments of the *_maker requests.
type makerArgs struct {
	SrcTable   string   `json:"src_table"`
	Dblink     int      `json:"dblink"`
	Pulldata   *bool    `json:"pulldata"`
	Index      *bool    `json:"index"`
	Filter     []string `json:"filter"`
	Condition  string   `json:"condition"`
	PostScript []string `json:"post_script"`
	Force      bool     `json:"force"` // refresh_snap(p_force): copy even when the source looks unchanged
}

func (m makerArgs) pull() bool    { return m.Pulldata == nil || *m.Pulldata }
func (m makerArgs) indexes() bool { return m.Index == nil || *m.Index }

// destroyerArgs are the arguments of the *_destroyer requests.
type destroyerArgs struct {
	Archive bool `json:"archive"`
	Force   bool `json:"force"` // remove the destination side even when the source's cannot be
}

func snapTables(view ident.Name) (ident.Name, ident.Name) {
	return view.Sibling("_snap1"), view.Sibling("_snap2")
}

// makeSnap creates the two tables and the view, loads the first table
// once, and records the config — all in one transaction.
func (a *Agent) makeSnap(ctx context.Context, r *run) error {
	var args makerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: args.Dblink, Table: args.SrcTable,
		Filter: args.Filter, Condition: args.Condition, Indexes: args.indexes()})
	if err != nil {
		return fmt.Errorf("snapshot_maker %s: %w", r.dest, err)
	}
	defer src.Release()
	snap1, snap2 := snapTables(r.dest)
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if err := checkNewDestination(ctx, tx, r.dest); err != nil {
			return fmt.Errorf("snapshot_maker %s: %w", r.dest, err)
		}
		rows, err := r.load(ctx, tx, loadSpec{src: src, table: st, condition: args.Condition, target: snap1,
			create: true, pull: args.pull(), indexes: args.indexes()})
		if err != nil {
			return fmt.Errorf("snapshot_maker %s: %w", r.dest, err)
		}
		if _, err := tx.Exec(ctx, "CREATE TABLE "+snap2.Sanitize()+" ("+columnDefs(st.Columns)+")"); err != nil {
			return fmt.Errorf("snapshot_maker %s: create %s: %w", r.dest, snap2, err)
		}
		if _, err := tx.Exec(ctx, viewSQL(r.dest, snap1, st.Columns, false)); err != nil {
			return fmt.Errorf("snapshot_maker %s: create view: %w", r.dest, err)
		}
		// Here too, not only after a rebuild: a broken script fails the
		// maker at once, and nothing is left created.
		if err := r.runPostScript(ctx, tx, args.PostScript); err != nil {
			return fmt.Errorf("snapshot_maker %s: %w", r.dest, err)
		}
		stats := st.Stats
		if !args.pull() {
			stats = nil // the first refresh must copy
		}
		if _, err := tx.Exec(ctx, sqlSnapInsertConfig, r.req.DestTable, args.Dblink, args.SrcTable,
			nullIfEmpty(args.Filter), nullString(args.Condition), nullIfEmpty(args.PostScript), args.indexes(),
			statIns(stats), statUpd(stats), statDel(stats), lastRun(args.pull(), r), st.Filenode,
			copiedWith(args.Filter, args.Condition)); err != nil {
			return fmt.Errorf("snapshot_maker %s: record config: %w", r.dest, err)
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("created %s over %s and %s; copied %d rows", r.dest, snap1.Table, snap2.Table, rows))
	})
}

// refreshSnap reloads the idle snap table and swaps the view to it. A run
// that finds the source's write counters unchanged since the last run, and
// its columns the same, skips the copy, unless forced.
func (a *Agent) refreshSnap(ctx context.Context, r *run) error {
	var args makerArgs // only pulldata and force apply
	if err := r.args(&args); err != nil {
		return err
	}
	cfg, err := loadSnapConfig(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return err
	}
	condition := deref(cfg.Condition)
	// The counters are read before the copy, so writes during the copy
	// count as changes for the next run.
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: cfg.Dblink, Table: cfg.Source,
		Filter: cfg.Filter, Condition: condition, Indexes: cfg.Indexes})
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	defer src.Release()
	snap1, snap2 := snapTables(r.dest)
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		active, idle, err := activeSnap(ctx, tx, r.dest, snap1, snap2)
		if err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		current, err := relationColumns(ctx, tx, active)
		if err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		changed := !sameColumns(st.Columns, current)
		with := copiedWith(cfg.Filter, condition)
		if !args.pull() && !changed {
			msg := "skipped copy: p_pulldata is false"
			r.note(ctx, "Check arguments", msg, false)
			return r.complete(ctx, tx, 0, msg)
		}
		if !args.Force && cfg.unchanged(st, !changed, with) {
			msg := "skipped copy: no inserts, updates or deletes on the source since the last run (statistics unchanged)"
			r.note(ctx, "Check source statistics", msg, false)
			if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
				return fmt.Errorf("refresh %s: record run: %w", r.dest, err)
			}
			return r.complete(ctx, tx, 0, msg)
		}
		if changed {
			r.note(ctx, "Check source columns", "source columns changed: recreating tables and view", false)
		}
		// What this run replaces keeps its owner and grants. Captured
		// before anything is dropped, so a role the agent cannot act for
		// fails the run before the copy.
		replaced := []ident.Name{r.dest, idle}
		if changed {
			replaced = append(replaced, active)
		}
		was := make(map[ident.Name]access, len(replaced))
		for _, rel := range replaced {
			if was[rel], err = accessOf(ctx, tx, rel); err != nil {
				return fmt.Errorf("refresh %s: %w", r.dest, err)
			}
		}
		if _, err := tx.Exec(ctx, "DROP TABLE IF EXISTS "+idle.Sanitize()); err != nil {
			return fmt.Errorf("refresh %s: drop %s: %w", r.dest, idle, err)
		}
		rows, err := r.load(ctx, tx, loadSpec{src: src, table: st, condition: condition, target: idle,
			create: true, pull: true, indexes: cfg.Indexes, keep: was[idle]})
		if err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		if err := r.step(ctx, "Swap view to "+idle.Table, func() (string, error) {
			return "view " + r.dest.String() + " now reads " + idle.Table, swapView(ctx, tx, was[r.dest], idle, st.Columns, changed)
		}); err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		if changed {
			// The old active table still has the old columns: give it the
			// new ones, so both tables match the view again.
			if _, err := tx.Exec(ctx, "DROP TABLE "+active.Sanitize()); err != nil {
				return fmt.Errorf("refresh %s: drop %s: %w", r.dest, active, err)
			}
			if _, err := tx.Exec(ctx, "CREATE TABLE "+active.Sanitize()+" ("+columnDefs(st.Columns)+")"); err != nil {
				return fmt.Errorf("refresh %s: create %s: %w", r.dest, active, err)
			}
			if err := was[active].restore(ctx, tx); err != nil {
				return fmt.Errorf("refresh %s: %w", r.dest, err)
			}
			if err := r.runPostScript(ctx, tx, cfg.PostScript); err != nil {
				return fmt.Errorf("refresh %s: %w", r.dest, err)
			}
		}
		if _, err := tx.Exec(ctx, sqlSnapUpdateConfig, r.req.DestTable, statIns(st.Stats), statUpd(st.Stats), statDel(st.Stats),
			r.started, st.Filenode, with); err != nil {
			return fmt.Errorf("refresh %s: record run: %w", r.dest, err)
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("copied %d rows into %s", rows, idle.Table))
	})
}

// destroySnap removes the view and both tables, or with archive keeps the
// data as a plain table under the destination's name (with the view's
// owner and grants).
func (a *Agent) destroySnap(ctx context.Context, r *run) error {
	var args destroyerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	snap1, snap2 := snapTables(r.dest)
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if _, err := loadSnapConfig(ctx, tx, r.req.DestTable); err != nil {
			return err
		}
		active, idle, err := activeSnap(ctx, tx, r.dest, snap1, snap2)
		if err != nil && !errors.Is(err, errViewMissing) {
			return fmt.Errorf("snapshot_destroyer %s: %w", r.dest, err)
		}
		if args.Archive && err != nil {
			return fmt.Errorf("snapshot_destroyer %s: cannot archive: %w", r.dest, err)
		}
		msg := "dropped " + r.dest.String() + " and its snap tables"
		if args.Archive {
			// The table takes the view's place, for the view's readers:
			// it gets the view's owner and grants (and keeps its own).
			view, err := accessOf(ctx, tx, r.dest)
			if err != nil {
				return fmt.Errorf("snapshot_destroyer %s: %w", r.dest, err)
			}
			if _, err := tx.Exec(ctx, "DROP VIEW "+r.dest.Sanitize()); err != nil {
				return fmt.Errorf("snapshot_destroyer %s: drop view: %w", r.dest, err)
			}
			if _, err := tx.Exec(ctx, "ALTER TABLE "+active.Sanitize()+" RENAME TO "+ident.Quote(r.dest.Table)); err != nil {
				return fmt.Errorf("snapshot_destroyer %s: rename %s: %w", r.dest, active, err)
			}
			if err := view.restore(ctx, tx); err != nil {
				return fmt.Errorf("snapshot_destroyer %s: %w", r.dest, err)
			}
			if _, err := tx.Exec(ctx, "DROP TABLE IF EXISTS "+idle.Sanitize()); err != nil {
				return fmt.Errorf("snapshot_destroyer %s: drop %s: %w", r.dest, idle, err)
			}
			msg = "archived " + r.dest.String() + " as a plain table"
		} else {
			for _, q := range []string{"DROP VIEW IF EXISTS " + r.dest.Sanitize(),
				"DROP TABLE IF EXISTS " + snap1.Sanitize(), "DROP TABLE IF EXISTS " + snap2.Sanitize()} {
				if _, err := tx.Exec(ctx, q); err != nil {
					return fmt.Errorf("snapshot_destroyer %s: %w", r.dest, err)
				}
			}
		}
		if _, err := tx.Exec(ctx, sqlDeleteConfig, r.req.DestTable); err != nil {
			return fmt.Errorf("snapshot_destroyer %s: delete config: %w", r.dest, err)
		}
		return r.complete(ctx, tx, 0, msg)
	})
}

var errViewMissing = errors.New("destination view is missing")

// activeSnap tells which snap table the view reads (active) and which is
// free to reload (idle).
func activeSnap(ctx context.Context, tx pgx.Tx, view, snap1, snap2 ident.Name) (active, idle ident.Name, err error) {
	var rel string
	err = tx.QueryRow(ctx, sqlViewSource, view.Sanitize()).Scan(&rel)
	if errors.Is(err, pgx.ErrNoRows) {
		return snap1, snap2, fmt.Errorf("%w: %s does not read %s or %s (recreate it: snapshot_destroyer, then snapshot_maker)",
			errViewMissing, view, snap1.Table, snap2.Table)
	}
	if err != nil {
		return active, idle, fmt.Errorf("inspect view %s: %w", view, err)
	}
	switch rel {
	case snap1.Table:
		return snap1, snap2, nil
	case snap2.Table:
		return snap2, snap1, nil
	}
	return active, idle, fmt.Errorf("%w: %s reads %q, not %s or %s", errViewMissing, view, rel, snap1.Table, snap2.Table)
}

// swapView points the view (its access captured by accessOf) at table.
// Same columns: CREATE OR REPLACE, which keeps owner, grants and
// dependants. Changed columns: drop and create, then restore the owner and
// grants it had.
func swapView(ctx context.Context, tx pgx.Tx, view access, table ident.Name, cols []column, changed bool) error {
	if !changed {
		if _, err := tx.Exec(ctx, viewSQL(view.rel, table, cols, true)); err != nil {
			return fmt.Errorf("replace view %s: %w", view.rel, err)
		}
		return nil
	}
	if _, err := tx.Exec(ctx, "DROP VIEW "+view.rel.Sanitize()); err != nil {
		return fmt.Errorf("drop view %s: %w", view.rel, err)
	}
	if _, err := tx.Exec(ctx, viewSQL(view.rel, table, cols, false)); err != nil {
		return fmt.Errorf("create view %s: %w", view.rel, err)
	}
	return view.restore(ctx, tx)
}

func viewSQL(view, table ident.Name, cols []column, replace bool) string {
	q := "CREATE VIEW "
	if replace {
		q = "CREATE OR REPLACE VIEW "
	}
	return q + view.Sanitize() + " AS SELECT " + columnList(cols) + " FROM " + table.Sanitize()
}

func loadSnapConfig(ctx context.Context, q queue.DB, dest string) (*snapConfig, error) {
	var c snapConfig
	var ins, upd, del *int64
	err := q.QueryRow(ctx, sqlSnapConfig, dest).Scan(&c.Source, &c.Dblink, &c.Filter, &c.Condition,
		&ins, &upd, &del, &c.Filenode, &c.CopiedWith, &c.PostScript, &c.Indexes)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%s: %w as snap", dest, ErrNotConfigured)
	}
	if err != nil {
		return nil, fmt.Errorf("read config of %s: %w", dest, err)
	}
	if ins != nil && upd != nil && del != nil {
		c.Stats = &tableStats{Ins: *ins, Upd: *upd, Del: *del}
	}
	return &c, nil
}

// checkNewDestination makes sure a maker does not overwrite anything.
func checkNewDestination(ctx context.Context, tx pgx.Tx, dest ident.Name) error {
	var configured, exists bool
	err := tx.QueryRow(ctx, `
SELECT EXISTS (SELECT 1 FROM mimeo.refresh_config WHERE dest_table = format('%I.%I', $1::text, $2::text)),
       to_regclass($3) IS NOT NULL`,
		dest.Schema, dest.Table, dest.Sanitize()).Scan(&configured, &exists)
	if err != nil {
		return fmt.Errorf("check destination: %w", err)
	}
	if configured || exists {
		return fmt.Errorf("%s: %w", dest, ErrDestinationExists)
	}
	return nil
}
