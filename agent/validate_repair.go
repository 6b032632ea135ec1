package agent

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/validate"
)

// repairStage is the staging table a logdel repair loads a chunk into.
const repairStage = "mimeo_validate_repair"

// repairWhere is which source rows a repair re-pulls: those the copy
// holds, except that an updater takes rows past last_value too (its next
// refresh upserts them again, which changes nothing).
func (t *checkTarget) repairWhere() string {
	if t.Type == "updater" {
		if t.Condition == "" {
			return ""
		}
		return strings.TrimPrefix(whereClause(t.Condition), "WHERE ")
	}
	return t.sourceWhere()
}

// repair re-pulls every differing chunk from the source snapshot stx into
// the destination, in dtx: the destination's rows of the chunk's key range
// are replaced by the source's (logdel: a live row the source lacks is
// marked deleted instead), set-based, one chunk at a time.
func (c *comparison) repair(ctx context.Context, stx, dtx pgx.Tx) (string, error) {
	cols := make([]column, len(c.spec.Columns))
	for i, col := range c.spec.Columns {
		cols[i] = column{Name: col.Name, Type: col.Type}
	}
	deleted := c.t.deletedColumn()
	if deleted != "" || c.t.keepsDeleted() {
		if _, err := dtx.Exec(ctx, "CREATE TEMP TABLE "+ident.Quote(repairStage)+" ("+columnDefs(cols)+") ON COMMIT DROP"); err != nil {
			return "", fmt.Errorf("create staging table: %w", err)
		}
	}
	srcWhere := c.t.repairWhere()
	target := c.target.Sanitize()
	keys := keyNames(c.spec.Key)
	for _, i := range c.differ {
		chunk := c.chunks[i]
		conds := []string{validate.RangeCondition(c.spec, chunk, "")}
		if srcWhere != "" {
			conds = append(conds, "("+srcWhere+")")
		}
		out := "COPY (SELECT " + columnList(cols) + " FROM " + c.t.Source.Sanitize() + " WHERE " + strings.Join(conds, " AND ") +
			") TO STDOUT (FORMAT binary)"
		var rows int64
		var err error
		if c.t.keepsDeleted() {
			rows, err = c.repairKept(ctx, stx, dtx, chunk, cols, out)
			if err != nil {
				return "", err
			}
		} else if deleted == "" {
			if _, err = dtx.Exec(ctx, "DELETE FROM "+target+" WHERE "+validate.RangeCondition(c.spec, chunk, "")); err != nil {
				return "", fmt.Errorf("remove the rows of %s: %w", describeChunk(c.spec, chunk), err)
			}
			rows, err = copyRows(ctx, stx.Conn().PgConn(), out, dtx.Conn().PgConn(),
				"COPY "+target+" ("+columnList(cols)+") FROM STDIN (FORMAT binary)")
			if err != nil {
				return "", fmt.Errorf("re-pull %s: %w", describeChunk(c.spec, chunk), err)
			}
		} else {
			stage := ident.Quote(repairStage)
			if _, err = dtx.Exec(ctx, "TRUNCATE "+stage); err != nil {
				return "", err
			}
			rows, err = copyRows(ctx, stx.Conn().PgConn(), out, dtx.Conn().PgConn(),
				"COPY "+stage+" ("+columnList(cols)+") FROM STDIN (FORMAT binary)")
			if err != nil {
				return "", fmt.Errorf("re-pull %s: %w", describeChunk(c.spec, chunk), err)
			}
			d := ident.Quote(deleted)
			stmts := []string{
				"UPDATE " + target + " d SET " + d + " = clock_timestamp() WHERE " + validate.RangeCondition(c.spec, chunk, "d") +
					" AND d." + d + " IS NULL AND NOT EXISTS (SELECT 1 FROM " + stage + " s WHERE " + keyMatch(keys, "d", "s") + ")",
				"DELETE FROM " + target + " d USING " + stage + " s WHERE " + keyMatch(keys, "d", "s"),
				"INSERT INTO " + target + " (" + columnList(cols) + ") SELECT " + columnList(cols) + " FROM " + stage,
			}
			if len(keys) == 0 {
				// No key: the chunk is the whole table; its live rows are
				// replaced, its deleted ones stay.
				stmts = []string{
					"DELETE FROM " + target + " WHERE " + d + " IS NULL",
					stmts[2],
				}
			}
			if err := execAll(ctx, dtx, "repair "+describeChunk(c.spec, chunk), stmts); err != nil {
				return "", err
			}
		}
		c.repaired += rows
	}
	return fmt.Sprintf("re-pulled %d rows in %d chunks", c.repaired, len(c.differ)), nil
}

// repairKept re-pulls a chunk of an inserter or updater without removing
// the destination rows the source deleted (they are kept on purpose): the
// source's rows replace those of the same unique key; without one (an
// inserter may have none) the destination gets the source rows it lacks.
func (c *comparison) repairKept(ctx context.Context, stx, dtx pgx.Tx, chunk validate.Chunk, cols []column, out string) (int64, error) {
	stage := ident.Quote(repairStage)
	target := c.target.Sanitize()
	if _, err := dtx.Exec(ctx, "TRUNCATE "+stage); err != nil {
		return 0, err
	}
	if _, err := copyRows(ctx, stx.Conn().PgConn(), out, dtx.Conn().PgConn(),
		"COPY "+stage+" ("+columnList(cols)+") FROM STDIN (FORMAT binary)"); err != nil {
		return 0, fmt.Errorf("re-pull %s: %w", describeChunk(c.spec, chunk), err)
	}
	var stmts []string
	if len(c.match) > 0 {
		stmts = []string{
			"DELETE FROM " + target + " d USING " + stage + " s WHERE " + keyMatch(keyNames(c.match), "d", "s"),
			"INSERT INTO " + target + " (" + columnList(cols) + ") SELECT " + columnList(cols) + " FROM " + stage,
		}
	} else {
		row := func(alias string) string {
			names := make([]string, len(cols))
			for i, col := range cols {
				names[i] = alias + "." + ident.Quote(col.Name)
			}
			return "md5(ROW(" + strings.Join(names, ", ") + ")::text)"
		}
		// The n-th copy of a source row is added when the destination
		// holds fewer than n of it.
		stmts = []string{"WITH have AS (SELECT " + row("d") + " AS h, count(*) AS n FROM " + target + " d WHERE " +
			validate.RangeCondition(c.spec, chunk, "d") + " GROUP BY 1), " +
			"want AS (SELECT s.*, " + row("s") + " AS mimeo_h, row_number() OVER (PARTITION BY " + row("s") + ") AS mimeo_n FROM " + stage + " s) " +
			"INSERT INTO " + target + " (" + columnList(cols) + ") SELECT " + qualified("w", cols) +
			" FROM want w LEFT JOIN have ON have.h = w.mimeo_h WHERE w.mimeo_n > coalesce(have.n, 0)"}
	}
	var rows int64
	for _, q := range stmts {
		tag, err := dtx.Exec(ctx, q)
		if err != nil {
			return 0, fmt.Errorf("repair %s: %w", describeChunk(c.spec, chunk), err)
		}
		if strings.HasPrefix(q, "INSERT") || strings.HasPrefix(q, "WITH") {
			rows = tag.RowsAffected()
		}
	}
	return rows, nil
}

// qualified lists cols as alias."col".
func qualified(alias string, cols []column) string {
	names := make([]string, len(cols))
	for i, col := range cols {
		names[i] = alias + "." + ident.Quote(col.Name)
	}
	return strings.Join(names, ", ")
}
