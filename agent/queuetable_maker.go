package agent

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/queue"
	"github.com/mimeo-dev/mimeo/triggers"
)

// queueMakerArgs are the arguments of dml_maker / logdel_maker.
type queueMakerArgs struct {
	makerArgs
	PkField []string `json:"pk_field"`
	PkType  []string `json:"pk_type"`
}

// makeQueued sets up dml or logdel replication. The triggers and the
// initial copy meet at one consistent point: one source session creates the
// triggers (their locks wait for writers in flight) and exports a snapshot
// taken after that; a second session copies the table in that snapshot.
// Writes before it are in the copy, writes after it wait for the triggers
// and are queued: none is lost, none applied twice.
func (a *Agent) makeQueued(ctx context.Context, r *run, typ string) error {
	var args queueMakerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("%s_maker %s: %w", typ, r.dest, err) }
	ddl, st, err := a.openSource(ctx, r, sourceSpec{Dblink: args.Dblink, Table: args.SrcTable,
		Filter: args.Filter, Condition: args.Condition, Indexes: true})
	if err != nil {
		return fail(err)
	}
	defer ddl.Release()
	keys, keyTypes, err := updaterKey(st, args.PkField, args.PkType)
	if err != nil {
		return fail(err)
	}
	// updaterKey only picks copied columns: their types are the source's.
	spec, err := newQueueSpec(ctx, r, typ, st, keys)
	if err != nil {
		return fail(err)
	}
	if err := spec.Validate(); err != nil {
		return fail(err)
	}
	for _, reserved := range []string{deletedColumn, presentColumn, existsColumn, triggers.ColDeletedAt} {
		if containsColumn(st.Columns, reserved) {
			return fail(fmt.Errorf("source column %q clashes with a column mimeo uses; leave it out with p_filter", reserved))
		}
	}
	names := spec.Names()
	role, err := checkQueueSchema(ctx, ddl)
	if err != nil {
		return fail(err)
	}
	// A partitioned table carries the triggers on every table of its tree.
	tree, err := sourceTree(ctx, ddl, st.Name, names.Function)
	if err != nil {
		return fail(err)
	}
	spec.Tables = treeNames(tree)
	if err := checkTriggerRights(tree, role); err != nil {
		return fail(err)
	}
	// The source objects are named after this destination table: check it
	// is free before touching them (the table lock keeps it free).
	if err := withTx(ctx, r.dst, func(tx pgx.Tx) error { return checkNewDestination(ctx, tx, r.dest) }); err != nil {
		return fail(err)
	}
	// Both source sessions are at hand before any lock is taken.
	cp, _, err := a.sources.acquire(ctx, r.dst, args.Dblink)
	if err != nil {
		return fail(err)
	}
	defer cp.Release()

	// Session one: the triggers, then the snapshot.
	trig, err := beginWrite(ctx, ddl)
	if err != nil {
		return fail(err)
	}
	defer func() { _ = trig.Rollback(context.WithoutCancel(ctx)) }()
	// The trigger DDL locks the source table against writes: never queue
	// the application behind a long wait for that lock.
	if _, err := trig.Exec(ctx, sqlDDLLockTimeout); err != nil {
		return fail(err)
	}
	// A maker retried after a crash finds its own leftovers: replace them.
	if err := execAll(ctx, trig, "create source objects", append(names.Drop(), spec.Create()...)); err != nil {
		return fail(lockHint(err))
	}
	var snapshot string
	if err := trig.QueryRow(ctx, `SELECT pg_export_snapshot()`).Scan(&snapshot); err != nil {
		return fail(fmt.Errorf("export snapshot: %w", err))
	}
	// Session two: the copy, in that snapshot.
	snap, err := cp.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return fail(err)
	}
	defer func() { _ = snap.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := snap.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snapshot)); err != nil {
		return fail(fmt.Errorf("import snapshot: %w", err))
	}
	if err := trig.Commit(ctx); err != nil {
		return fail(fmt.Errorf("commit source objects: %w", err))
	}
	r.note(ctx, "Create source objects", fmt.Sprintf("queue %s, function %s, triggers %s",
		names.Queue, names.Function, strings.Join(names.Triggers(), ", ")), false)

	err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if err := checkNewDestination(ctx, tx, r.dest); err != nil {
			return err
		}
		rows, err := r.load(ctx, tx, loadSpec{src: cp, table: st, condition: args.Condition, target: r.dest,
			create: true, pull: args.pull(), indexes: args.indexes()})
		if err != nil {
			return err
		}
		if typ == "logdel" {
			if _, err := tx.Exec(ctx, "ALTER TABLE "+r.dest.Sanitize()+" ADD COLUMN "+ident.Quote(deletedColumn)+" timestamptz"); err != nil {
				return fmt.Errorf("add %s: %w", deletedColumn, err)
			}
			if err := ensureDeletedIndex(ctx, tx, r.dest); err != nil {
				return err
			}
		}
		if err := ensureKeyIndex(ctx, tx, r.dest, keys); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+typeConfigTable(typ)+`
    (dest_table, type, dblink, source_table, filter, condition, create_indexes, last_run,
     pk_field, pk_type, queue_table, trigger_function, triggers, columns, post_script, source_layout, trigger_tables)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)`,
			r.req.DestTable, typ, args.Dblink, args.SrcTable, nullIfEmpty(args.Filter), nullString(args.Condition),
			args.indexes(), lastRun(args.pull(), r), keys, keyTypes, names.Queue.String(), names.Function.String(),
			names.Triggers(), columnNames(st.Columns), nullIfEmpty(args.PostScript), triggers.Layout, treeStrings(tree)); err != nil {
			return fmt.Errorf("record config: %w", err)
		}
		if err := r.runPostScript(ctx, tx, args.PostScript); err != nil {
			return err
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("created %s and the source's queue %s; copied %d rows", r.dest, names.Queue, rows))
	})
	if err != nil {
		// Leave nothing half-created on the source either.
		if derr := execSource(context.WithoutCancel(ctx), ddl, append([]string{sqlDDLLockTimeout}, names.Drop()...)); derr != nil {
			r.log.Warn("cannot remove the source objects of a failed maker", "error", derr)
		}
		return fail(err)
	}
	return nil
}

// ensureDeletedIndex indexes a logdel destination's mimeo_source_deleted
// (deleted rows are what such a copy is looked up by), unless an index
// leads with it already.
func ensureDeletedIndex(ctx context.Context, db queue.DB, dest ident.Name) error {
	_, err := db.Exec(ctx, `DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                   WHERE i.indrelid = `+quoteLiteral(dest.Sanitize())+`::regclass AND a.attname = `+quoteLiteral(deletedColumn)+`) THEN
        CREATE INDEX `+ident.Quote(ident.Derive(dest.Table, "_"+deletedColumn))+` ON `+dest.Sanitize()+` (`+ident.Quote(deletedColumn)+`);
    END IF;
END $$`)
	if err != nil {
		return fmt.Errorf("index %s of %s: %w", deletedColumn, dest, err)
	}
	return nil
}

// sqlDDLLockTimeout bounds how long source DDL waits for its table lock.
const sqlDDLLockTimeout = `SET LOCAL lock_timeout = '10s'`

// lockHint explains a lock timeout of source DDL.
func lockHint(err error) error {
	if hasCode(err, codeLockNotAvailable) {
		return fmt.Errorf("%w (a long transaction holds the source table; retry when it has ended)", err)
	}
	return err
}

// destroyQueued removes the source objects this table's config names, then
// the config and (unless ARCHIVE) the destination table.
func (a *Agent) destroyQueued(ctx context.Context, r *run, typ string) error {
	var args destroyerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	cfg, err := loadQueueConfig(ctx, r.dst, typ, r.req.DestTable)
	if err != nil {
		return err
	}
	leftSQL := strings.Join(cfg.Names.Drop(), "; ") + ";"
	err = func() error {
		src, _, err := a.sources.acquire(ctx, r.dst, cfg.Dblink)
		if err != nil {
			return err
		}
		defer src.Release()
		if err := execSource(ctx, src, append([]string{sqlDDLLockTimeout}, cfg.Names.Drop()...)); err != nil {
			return fmt.Errorf("remove source objects: %w", lockHint(err))
		}
		r.note(ctx, "Remove source objects", "removed "+cfg.Names.Queue.String()+", "+cfg.Names.Function.String()+" and the triggers", false)
		return nil
	}()
	if err != nil {
		if !args.Force || ctx.Err() != nil {
			return fmt.Errorf("%s_destroyer %s: %w (the source objects must be removed first; fix the connection and retry, or use p_force => true)",
				typ, r.dest, err)
		}
		left := fmt.Sprintf("p_force: the source objects stay on source %d (%v); remove them there, as the replication role: %s",
			cfg.Dblink, err, leftSQL)
		r.note(ctx, "Remove source objects", left, true)
		r.beforeComplete = func(_ context.Context, _ pgx.Tx, message string) (string, error) {
			return message + "; " + left, nil
		}
	}
	return a.destroyTable(ctx, r)
}

// unconstrained drops NOT NULL (staging tables hold what the queue holds).
func unconstrained(cols []column) []column {
	out := make([]column, len(cols))
	for i, c := range cols {
		c.NotNull = false
		out[i] = c
	}
	return out
}
