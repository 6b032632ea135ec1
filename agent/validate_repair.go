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
		return t.condition()
	}
	return t.sourceWhere()
}

// repair re-pulls every differing chunk from the source snapshot stx into
// the destination, in dtx: the destination's rows of the chunk's key range
// are replaced by the source's (logdel: a live row the source lacks is
// marked deleted instead; inserter, updater: see keptStatements),
// set-based, one chunk at a time.
func (c *comparison) repair(ctx context.Context, stx, dtx pgx.Tx) (string, error) {
	deleted := c.t.deletedColumn()
	staged := deleted != "" || c.t.keepsDeleted()
	if staged {
		if _, err := dtx.Exec(ctx, "CREATE TEMP TABLE "+ident.Quote(repairStage)+" ("+columnDefs(unconstrained(c.cols))+") ON COMMIT DROP"); err != nil {
			return "", fmt.Errorf("create staging table: %w", err)
		}
	}
	srcWhere := c.t.repairWhere()
	target := c.target.Sanitize()
	for _, i := range c.differ {
		chunk := c.chunks[i]
		conds := []string{validate.RangeCondition(c.spec, chunk, "")}
		if srcWhere != "" {
			conds = append(conds, "("+srcWhere+")")
		}
		out := "COPY (SELECT " + columnList(c.cols) + " FROM " + c.t.Source.Sanitize() + " WHERE " + strings.Join(conds, " AND ") +
			") TO STDOUT (FORMAT binary)"
		into := target
		if staged {
			into = ident.Quote(repairStage)
			if _, err := dtx.Exec(ctx, "TRUNCATE "+into); err != nil {
				return "", err
			}
		} else if _, err := dtx.Exec(ctx, "DELETE FROM "+target+" WHERE "+validate.RangeCondition(c.spec, chunk, "")); err != nil {
			return "", fmt.Errorf("remove the rows of %s: %w", describeChunk(c.spec, chunk), err)
		}
		rows, err := copyRows(ctx, stx.Conn().PgConn(), out, dtx.Conn().PgConn(),
			"COPY "+into+" ("+columnList(c.cols)+") FROM STDIN (FORMAT binary)")
		if err != nil {
			return "", fmt.Errorf("re-pull %s: %w", describeChunk(c.spec, chunk), err)
		}
		var stmts []string
		switch {
		case c.t.keepsDeleted():
			stmts = c.keptStatements(chunk)
		case deleted != "":
			stmts = c.logdelStatements(chunk, deleted)
		}
		for j, q := range stmts {
			tag, err := dtx.Exec(ctx, q)
			if err != nil {
				return "", fmt.Errorf("repair %s: %w", describeChunk(c.spec, chunk), err)
			}
			if j == len(stmts)-1 && c.t.keepsDeleted() {
				rows = tag.RowsAffected() // the rows added, not those staged
			}
		}
		c.repaired += rows
	}
	return fmt.Sprintf("re-pulled %d rows in %d chunks", c.repaired, len(c.differ)), nil
}

// logdelStatements move a staged logdel chunk in: a live row the source
// lacks is marked deleted, the others are replaced by the source's.
func (c *comparison) logdelStatements(chunk validate.Chunk, deleted string) []string {
	stage, target, keys := ident.Quote(repairStage), c.target.Sanitize(), keyNames(c.spec.Key)
	d := ident.Quote(deleted)
	insert := "INSERT INTO " + target + " (" + columnList(c.cols) + ") SELECT " + columnList(c.cols) + " FROM " + stage
	if len(keys) == 0 {
		// No key: the chunk is the whole table; its live rows are
		// replaced, its deleted ones stay.
		return []string{"DELETE FROM " + target + " WHERE " + d + " IS NULL", insert}
	}
	return []string{
		"UPDATE " + target + " d SET " + d + " = clock_timestamp() WHERE " + validate.RangeCondition(c.spec, chunk, "d") +
			" AND d." + d + " IS NULL AND NOT EXISTS (SELECT 1 FROM " + stage + " s WHERE " + keyMatch(keys, "d", "s") + ")",
		"DELETE FROM " + target + " d USING " + stage + " s WHERE " + keyMatch(keys, "d", "s"),
		insert,
	}
}

// keptStatements move a staged chunk of an inserter or updater in without
// removing the destination rows the source deleted (they are kept on
// purpose): the source's rows replace those of the same unique key;
// without one (an inserter may have none) the destination gets the source
// rows it lacks. The last statement adds the rows.
func (c *comparison) keptStatements(chunk validate.Chunk) []string {
	stage, target, cols := ident.Quote(repairStage), c.target.Sanitize(), columnList(c.cols)
	if len(c.match) > 0 {
		return []string{
			"DELETE FROM " + target + " d USING " + stage + " s WHERE " + keyMatch(keyNames(c.match), "d", "s"),
			"INSERT INTO " + target + " (" + cols + ") SELECT " + cols + " FROM " + stage,
		}
	}
	row := func(alias string) string { return "md5(ROW(" + qualified(alias, c.cols) + ")::text)" }
	// The n-th copy of a source row is added when the destination holds
	// fewer than n of it.
	return []string{"WITH have AS (SELECT " + row("d") + " AS h, count(*) AS n FROM " + target + " d WHERE " +
		validate.RangeCondition(c.spec, chunk, "d") + " GROUP BY 1), " +
		"want AS (SELECT s.*, " + row("s") + " AS mimeo_h, row_number() OVER (PARTITION BY " + row("s") + ") AS mimeo_n FROM " + stage + " s) " +
		"INSERT INTO " + target + " (" + cols + ") SELECT " + qualified("w", c.cols) +
		" FROM want w LEFT JOIN have ON have.h = w.mimeo_h WHERE w.mimeo_n > coalesce(have.n, 0)"}
}

// qualified lists cols as alias."col".
func qualified(alias string, cols []column) string {
	names := make([]string, len(cols))
	for i, col := range cols {
		names[i] = alias + "." + ident.Quote(col.Name)
	}
	return strings.Join(names, ", ")
}
