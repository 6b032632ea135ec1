package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// Snap refreshes drop and re-create destination relations under the same
// name. A new relation belongs to the agent's role and has no grants, so
// whatever a DBA set up on the old one (another owner, GRANTs) is captured
// before the drop and given to the replacement in the same transaction.

const (
	// The owner of a relation and whether the agent's role can give a
	// relation to it: it needs the owner's privileges (to drop or replace
	// the old relation, and ALTER ... OWNER TO needs membership), and the
	// owner needs CREATE on the schema. Names come quoted by quote_ident,
	// ready for SQL and for messages.
	sqlOwner = `
SELECT quote_ident(o.rolname), quote_ident(current_user), quote_ident(n.nspname),
       pg_has_role(o.oid, 'USAGE'), has_schema_privilege(o.oid, n.oid, 'CREATE')
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1)`

	// The privileges others than the owner hold on a relation.
	sqlGrants = `
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.rolname) END,
       a.privilege_type, a.is_grantable
FROM pg_catalog.pg_class c
CROSS JOIN LATERAL aclexplode(c.relacl) a
LEFT JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
WHERE c.oid = to_regclass($1) AND a.grantee <> c.relowner
ORDER BY 1, 2`
)

// access is who owns a relation and what others may do with it.
type access struct {
	rel       ident.Name
	owner     string   // quoted; "" when rel did not exist
	agent     string   // the agent's role, quoted
	schema    string   // rel's schema, quoted
	canCreate bool     // owner has CREATE on the schema
	grants    []string // GRANT statements that give them back
}

// accessOf captures rel's owner and grants before rel is dropped, for the
// relation that replaces it under the same name. A missing rel captures
// nothing. It fails with ErrOwnerUnreachable when rel belongs to a role
// whose privileges the agent's role lacks: it could neither replace rel
// nor give the replacement to that role.
func accessOf(ctx context.Context, tx pgx.Tx, rel ident.Name) (access, error) {
	a := access{rel: rel}
	var member bool
	err := tx.QueryRow(ctx, sqlOwner, rel.Sanitize()).Scan(&a.owner, &a.agent, &a.schema, &member, &a.canCreate)
	if errors.Is(err, pgx.ErrNoRows) {
		return a, nil
	}
	if err != nil {
		return a, fmt.Errorf("read owner of %s: %w", rel, err)
	}
	if !member {
		return a, fmt.Errorf("%w: %s is owned by %s, a role %s is not a member of (GRANT %s TO %s, or give it back: ALTER TABLE %s OWNER TO %s)",
			ErrOwnerUnreachable, rel, a.owner, a.agent, a.owner, a.agent, rel, a.agent)
	}
	if a.grants, err = grantsOf(ctx, tx, rel); err != nil {
		return a, err
	}
	return a, nil
}

// restore gives the relation now named a.rel the captured owner, then the
// captured grants (made after the owner change, they are recorded as the
// owner's).
func (a access) restore(ctx context.Context, tx pgx.Tx) error {
	if a.owner == "" {
		return nil
	}
	if a.owner != a.agent && !a.canCreate {
		return fmt.Errorf("%w: %s is owned by %s, which lacks CREATE on schema %s to own its re-created copy (GRANT CREATE ON SCHEMA %s TO %s)",
			ErrOwnerUnreachable, a.rel, a.owner, a.schema, a.schema, a.owner)
	}
	// ALTER TABLE serves views too, and takes the table's indexes along.
	if _, err := tx.Exec(ctx, "ALTER TABLE "+a.rel.Sanitize()+" OWNER TO "+a.owner); err != nil {
		return fmt.Errorf("give %s back to %s: %w", a.rel, a.owner, err)
	}
	return execAll(ctx, tx, "re-grant", a.grants)
}

// grantsOf returns the GRANT statements that give rel the privileges
// others than its owner hold on it now, so they can be re-applied after
// rel is replaced.
func grantsOf(ctx context.Context, tx pgx.Tx, rel ident.Name) ([]string, error) {
	rows, err := tx.Query(ctx, sqlGrants, rel.Sanitize())
	if err != nil {
		return nil, fmt.Errorf("read grants on %s: %w", rel, err)
	}
	grants, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (string, error) {
		var grantee, privilege string
		var grantable bool
		if err := row.Scan(&grantee, &privilege, &grantable); err != nil {
			return "", err
		}
		q := "GRANT " + privilege + " ON TABLE " + rel.Sanitize() + " TO " + grantee
		if grantable {
			q += " WITH GRANT OPTION"
		}
		return q, nil
	})
	if err != nil {
		return nil, fmt.Errorf("read grants on %s: %w", rel, err)
	}
	return grants, nil
}
