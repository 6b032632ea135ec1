// Package ident parses and builds PostgreSQL identifiers: schema-qualified
// names as mimeo stores them, and derived names (snap tables, indexes,
// triggers) that must fit PostgreSQL's 63-byte limit and stay unique.
package ident

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
)

// MaxLen is PostgreSQL's identifier limit in bytes (NAMEDATALEN - 1).
const MaxLen = 63

// ErrNotQualified means a name was not of the form schema.table.
var ErrNotQualified = errors.New("name must be schema-qualified (schema.table)")

// Name is a schema-qualified relation name, its parts unquoted.
type Name struct {
	Schema string
	Table  string
}

// Parse splits a schema-qualified name with the rules of PostgreSQL's
// parse_ident: double-quoted parts keep their case and may hold anything
// (a doubled quote stands for one); bare parts are folded to lower case.
func Parse(s string) (Name, error) {
	var parts []string
	rest := strings.TrimSpace(s)
	for {
		var part string
		if strings.HasPrefix(rest, `"`) {
			var b strings.Builder
			i := 1
			for {
				j := strings.IndexByte(rest[i:], '"')
				if j < 0 {
					return Name{}, fmt.Errorf("parse %q: unterminated quoted identifier", s)
				}
				b.WriteString(rest[i : i+j])
				i += j + 1
				if i < len(rest) && rest[i] == '"' {
					b.WriteByte('"')
					i++
					continue
				}
				break
			}
			part, rest = b.String(), rest[i:]
			if part == "" {
				return Name{}, fmt.Errorf("parse %q: empty quoted identifier", s)
			}
		} else {
			j := strings.IndexByte(rest, '.')
			if j < 0 {
				j = len(rest)
			}
			part, rest = strings.TrimSpace(rest[:j]), rest[j:]
			if part == "" || strings.ContainsAny(part, `" `) {
				return Name{}, fmt.Errorf("parse %q: invalid identifier", s)
			}
			part = strings.ToLower(part)
		}
		parts = append(parts, part)
		rest = strings.TrimSpace(rest)
		if rest == "" {
			break
		}
		if rest[0] != '.' {
			return Name{}, fmt.Errorf("parse %q: unexpected %q", s, rest)
		}
		rest = strings.TrimSpace(rest[1:])
	}
	if len(parts) != 2 {
		return Name{}, fmt.Errorf("parse %q: %w", s, ErrNotQualified)
	}
	return Name{Schema: parts[0], Table: parts[1]}, nil
}

// Sanitize returns the name quoted for SQL: "schema"."table".
func (n Name) Sanitize() string { return pgx.Identifier{n.Schema, n.Table}.Sanitize() }

// String returns the name for messages, as PostgreSQL's format('%I.%I')
// prints it: parts are quoted only when they need to be. Use Sanitize for SQL.
func (n Name) String() string { return Display(n.Schema) + "." + Display(n.Table) }

// Display returns one identifier (a column, say) for messages, quoted only
// when it needs to be, as String quotes the parts of a Name. Use Quote for
// SQL.
func Display(s string) string {
	for i, r := range s {
		if !(r == '_' || (r >= 'a' && r <= 'z') || (i > 0 && (r >= '0' && r <= '9' || r == '$'))) {
			return Quote(s)
		}
	}
	if s == "" {
		return Quote(s)
	}
	return s
}

// Sibling returns a relation in the same schema named table+suffix, cut to
// fit MaxLen by Derive.
func (n Name) Sibling(suffix string) Name {
	return Name{Schema: n.Schema, Table: Derive(n.Table, suffix)}
}

// Quote quotes one identifier.
func Quote(s string) string { return pgx.Identifier{s}.Sanitize() }

// Derive returns base+suffix when it fits MaxLen bytes. Otherwise it cuts
// base (on a character boundary) and inserts a short hash of the full name,
// so the result is deterministic, fits, and differs for different inputs.
func Derive(base, suffix string) string {
	full := base + suffix
	if len(full) <= MaxLen {
		return full
	}
	sum := sha256.Sum256([]byte(full))
	tag := "_" + hex.EncodeToString(sum[:4])
	keep := MaxLen - len(tag) - len(suffix)
	if keep < 0 {
		// The suffix alone is too long: hash everything.
		return cut(full, MaxLen-len(tag)) + tag
	}
	return cut(base, keep) + tag + suffix
}

// cut shortens s to at most n bytes without splitting a UTF-8 character.
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
