package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// The table type truncates and reloads an ordinary table in one
// transaction (readers wait for the commit, never see it half-full). It is
// meant for dev copies: no view, no swap, and a source whose columns
// changed is an error rather than a rebuild.

const (
	sqlTableConfig = `
SELECT source_table, dblink, filter, condition, create_indexes, sequences
FROM mimeo.refresh_config_table WHERE dest_table = $1`

	// The destination columns whose default draws from a sequence.
	sqlSequenceColumns = `
SELECT a.attname FROM pg_catalog.pg_depend dep
JOIN pg_catalog.pg_attrdef ad ON dep.classid = 'pg_catalog.pg_attrdef'::regclass AND dep.objid = ad.oid
JOIN pg_catalog.pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
WHERE dep.refclassid = 'pg_catalog.pg_class'::regclass AND dep.refobjid = to_regclass($1)
  AND ad.adrelid = to_regclass($2)
ORDER BY a.attnum`

	sqlTableInsertConfig = `
INSERT INTO mimeo.refresh_config_table
    (dest_table, type, dblink, source_table, filter, condition, create_indexes, sequences, last_run)
VALUES ($1, 'table', $2, $3, $4, $5, $6, $7, $8)`
)

type tableMakerArgs struct {
	makerArgs
	Sequences []string `json:"sequences"`
}

type refreshTableArgs struct {
	TruncateCascade bool `json:"truncate_cascade"`
}

func (a *Agent) makeTable(ctx context.Context, r *run) error {
	var args tableMakerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: args.Dblink, Table: args.SrcTable,
		Filter: args.Filter, Condition: args.Condition, Indexes: args.indexes()})
	if err != nil {
		return fmt.Errorf("table_maker %s: %w", r.dest, err)
	}
	defer src.Release()
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		if err := checkNewDestination(ctx, tx, r.dest); err != nil {
			return fmt.Errorf("table_maker %s: %w", r.dest, err)
		}
		rows, err := r.load(ctx, tx, loadSpec{src: src, table: st, condition: args.Condition, target: r.dest,
			create: true, pull: args.pull(), indexes: args.indexes()})
		if err != nil {
			return fmt.Errorf("table_maker %s: %w", r.dest, err)
		}
		if _, err := tx.Exec(ctx, sqlTableInsertConfig, r.req.DestTable, args.Dblink, args.SrcTable,
			nullIfEmpty(args.Filter), nullString(args.Condition), args.indexes(), nullIfEmpty(args.Sequences),
			lastRun(args.pull(), r)); err != nil {
			return fmt.Errorf("table_maker %s: record config: %w", r.dest, err)
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("created %s; copied %d rows", r.dest, rows))
	})
}

func (a *Agent) refreshTable(ctx context.Context, r *run) error {
	var args refreshTableArgs
	if err := r.args(&args); err != nil {
		return err
	}
	var source string
	var dblink int
	var filter []string
	var condition *string
	var indexes bool
	var sequences []string
	err := r.dst.QueryRow(ctx, sqlTableConfig, r.req.DestTable).Scan(&source, &dblink, &filter, &condition, &indexes, &sequences)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%s: %w as table", r.req.DestTable, ErrNotConfigured)
	}
	if err != nil {
		return fmt.Errorf("read config of %s: %w", r.req.DestTable, err)
	}
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: dblink, Table: source, Filter: filter, Condition: deref(condition)})
	if err != nil {
		return fmt.Errorf("refresh %s: %w", r.dest, err)
	}
	defer src.Release()
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		current, err := relationColumns(ctx, tx, r.dest)
		if err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		if current == nil {
			return fmt.Errorf("refresh %s: destination table is missing (recreate it: table_destroyer, then table_maker)", r.dest)
		}
		if !sameColumns(st.Columns, current) {
			return fmt.Errorf("refresh %s: %w on %s; the table type does not rebuild tables: run table_destroyer and table_maker again",
				r.dest, ErrColumnsChanged, st.Name)
		}
		rows, err := r.load(ctx, tx, loadSpec{src: src, table: st, condition: deref(condition), target: r.dest,
			cascade: args.TruncateCascade, pull: true})
		if err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		if err := resetSequences(ctx, tx, r.dest, sequences); err != nil {
			return fmt.Errorf("refresh %s: %w", r.dest, err)
		}
		if _, err := tx.Exec(ctx, sqlRecordRun, r.req.DestTable, r.started); err != nil {
			return fmt.Errorf("refresh %s: record run: %w", r.dest, err)
		}
		return r.complete(ctx, tx, rows, fmt.Sprintf("reloaded %d rows", rows))
	})
}

// destroyTable ends the replication of a plain destination table (table,
// inserter, updater): the config goes, and the table too unless ARCHIVE.
func (a *Agent) destroyTable(ctx context.Context, r *run) error {
	var args destroyerArgs
	if err := r.args(&args); err != nil {
		return err
	}
	return withTx(ctx, r.dst, func(tx pgx.Tx) error {
		msg := "kept " + r.dest.String() + " as a plain table"
		if !args.Archive {
			if _, err := tx.Exec(ctx, "DROP TABLE IF EXISTS "+r.dest.Sanitize()); err != nil {
				return fmt.Errorf("%s %s: %w", r.req.Action, r.dest, err)
			}
			msg = "dropped " + r.dest.String()
		}
		tag, err := tx.Exec(ctx, sqlDeleteConfig, r.req.DestTable)
		if err != nil {
			return fmt.Errorf("%s %s: delete config: %w", r.req.Action, r.dest, err)
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("%s: %w", r.req.DestTable, ErrNotConfigured)
		}
		return r.complete(ctx, tx, 0, msg)
	})
}

// resetSequences moves each of the table's p_sequences (destination
// sequences that defaults of its columns draw from) past the largest value
// just loaded, so rows inserted on the dev copy do not collide with it.
func resetSequences(ctx context.Context, tx pgx.Tx, dest ident.Name, sequences []string) error {
	for _, seq := range sequences {
		name, err := ident.Parse(seq)
		if err != nil {
			return fmt.Errorf("p_sequences: %w", err)
		}
		rows, err := tx.Query(ctx, sqlSequenceColumns, name.Sanitize(), dest.Sanitize())
		if err != nil {
			return fmt.Errorf("find columns using sequence %s: %w", name, err)
		}
		cols, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return fmt.Errorf("find columns using sequence %s: %w", name, err)
		}
		if len(cols) == 0 {
			return fmt.Errorf("p_sequences: no column of %s has a default drawing from %s", dest, name)
		}
		maxes := make([]string, len(cols))
		for i, c := range cols {
			maxes[i] = "max(" + ident.Quote(c) + ")"
		}
		if _, err := tx.Exec(ctx, "SELECT setval($1::regclass, coalesce(greatest("+strings.Join(maxes, ", ")+"), 1), greatest("+
			strings.Join(maxes, ", ")+") IS NOT NULL) FROM "+dest.Sanitize(), name.Sanitize()); err != nil {
			return fmt.Errorf("reset sequence %s: %w", name, err)
		}
	}
	return nil
}
