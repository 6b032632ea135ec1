// Package owner says what a DBA grants when the agent's role lacks the
// rights of a destination table's owner (a table handed to another role).
package owner

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// Querier is what Hint reads the catalog through.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Hint returns, for a relation owned by a role whose rights the current
// role lacks, the statements that let the current role alter it; "" when
// it has them (or the relation is gone). rel is as regclass reads it.
func Hint(ctx context.Context, db Querier, rel string) string {
	var name, owner, agent string
	var member bool
	err := db.QueryRow(ctx, `SELECT format('%I.%I', n.nspname, c.relname), quote_ident(o.rolname), quote_ident(current_user), pg_has_role(o.oid, 'USAGE')
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1)`, rel).Scan(&name, &owner, &agent, &member)
	if err != nil || member {
		return ""
	}
	return name + " is owned by " + owner + ", and changing its columns needs that role's rights: on the destination run GRANT " +
		owner + " TO " + agent + " (or give the table back: ALTER TABLE " + name + " OWNER TO " + agent + ")"
}
