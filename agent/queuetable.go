package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/queue"
	"github.com/mimeo-dev/mimeo/triggers"
)

// dml and logdel replay changes queued on the source by triggers (see
// package triggers). A short source transaction reads a batch of entries,
// the destination deletes their keys and inserts the source's current rows
// in one transaction, and only then are the entries read deleted from the
// queue. A crash in between leaves them: the next run applies them again
// from the source's current state, which is idempotent (see
// replayBatches).

// deletedColumn marks, in a logdel destination, when a row was deleted on
// the source (NULL for live rows).
const deletedColumn = "mimeo_source_deleted"

// queueConfig is a row of mimeo.refresh_config_dml or _logdel.
type queueConfig struct {
	Type          string
	Source        string
	Dblink        int
	Filter        []string
	Condition     string
	BatchLimit    int
	Indexes       bool
	PkField       []string
	Columns       []string // the source columns the destination was built with (nil: its own)
	PostScript    []string
	Layout        int      // of the source objects, as last recorded
	TriggerTables []string // tables carrying the triggers, as last recorded
	Names         triggers.Names
}

func loadQueueConfig(ctx context.Context, q queue.DB, typ, dest string) (*queueConfig, error) {
	c := &queueConfig{Type: typ}
	var queueTable, function string
	var trig []string
	err := q.QueryRow(ctx, `
SELECT source_table, dblink, filter, coalesce(condition, ''), batch_limit, create_indexes, pk_field, columns,
       post_script, source_layout, trigger_tables, queue_table, trigger_function, triggers
FROM `+typeConfigTable(typ)+` WHERE dest_table = $1`, dest).Scan(
		&c.Source, &c.Dblink, &c.Filter, &c.Condition, &c.BatchLimit, &c.Indexes, &c.PkField, &c.Columns,
		&c.PostScript, &c.Layout, &c.TriggerTables, &queueTable, &function, &trig)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%s: %w as %s", dest, ErrNotConfigured, typ)
	}
	if err != nil {
		return nil, fmt.Errorf("read config of %s: %w", dest, err)
	}
	if c.Names.Queue, err = ident.Parse(queueTable); err != nil {
		return nil, fmt.Errorf("config of %s: queue_table: %w", dest, err)
	}
	if c.Names.Function, err = ident.Parse(function); err != nil {
		return nil, fmt.Errorf("config of %s: trigger_function: %w", dest, err)
	}
	if len(trig) != 4 {
		return nil, fmt.Errorf("config of %s: triggers must name 4 triggers, has %d", dest, len(trig))
	}
	// Layout 1 named a key-change trigger where layout 2 has the TRUNCATE one.
	c.Names.Insert, c.Names.Update, c.Names.Delete, c.Names.Truncate = trig[0], trig[1], trig[2], trig[3]
	return c, nil
}

// beginWrite starts a read-write transaction on a source connection (the
// pool's sessions are read-only by default).
func beginWrite(ctx context.Context, src *pgxpool.Conn) (pgx.Tx, error) {
	return src.BeginTx(ctx, pgx.TxOptions{AccessMode: pgx.ReadWrite})
}

// execSource runs statements in one read-write source transaction.
func execSource(ctx context.Context, src *pgxpool.Conn, statements []string) error {
	tx, err := beginWrite(ctx, src)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if err := execAll(ctx, tx, "source", statements); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// keyMatch is "a.k1 = b.k1 AND ..." for the key columns.
func keyMatch(keys []string, a, b string) string {
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = a + "." + ident.Quote(k) + " = " + b + "." + ident.Quote(k)
	}
	return strings.Join(parts, " AND ")
}

// quoteNames quotes and joins column names.
func quoteNames(names []string) string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = ident.Quote(n)
	}
	return strings.Join(out, ", ")
}

// checkQueueSchema tells the DBA what to do when the source has no mimeo
// schema of the replication role's own for the queue, and returns the
// role's name, quoted.
func checkQueueSchema(ctx context.Context, src *pgxpool.Conn) (string, error) {
	var exists, owns bool
	var role string
	err := src.QueryRow(ctx, `
SELECT n.oid IS NOT NULL, coalesce(pg_has_role(n.nspowner, 'USAGE'), false), quote_ident(current_user)
FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = $1`, triggers.Schema).Scan(&exists, &owns, &role)
	if err != nil {
		return "", fmt.Errorf("check the source for triggers: %w", err)
	}
	if !exists {
		return "", fmt.Errorf("the source has no schema mimeo for the queue: on the source run CREATE SCHEMA mimeo AUTHORIZATION %s", role)
	}
	if !owns {
		return "", fmt.Errorf("the replication role does not own the source's schema mimeo: on the source run ALTER SCHEMA mimeo OWNER TO %s", role)
	}
	return role, nil
}

// checkTriggerRights names the tables of the tree the replication role
// may not put triggers on (or read, to queue the keys of a partition that
// joins), with the GRANT that lets it.
func checkTriggerRights(tree []treeMember, role string) error {
	var missing []string
	for _, m := range tree {
		if !m.CanTrigger {
			missing = append(missing, m.Name.String())
		}
	}
	if len(missing) == 0 {
		return nil
	}
	what := "the table"
	if len(tree) > 1 {
		what = "every table of the partition tree (a statement on a partition fires only that partition's triggers)"
	}
	return fmt.Errorf("the replication role needs SELECT and TRIGGER on %s: on the source run GRANT SELECT, TRIGGER ON %s TO %s",
		what, strings.Join(missing, ", "), role)
}
