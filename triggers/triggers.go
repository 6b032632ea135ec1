// Package triggers renders the source-side objects of dml and logdel
// replication: a queue table in the source's mimeo schema, a trigger
// function, and statement-level triggers whose transition tables write the
// queue set-based. Every identifier is quoted, and every derived name fits
// PostgreSQL's 63-byte limit.
//
// The triggers name no column but the key ones, in no WHEN clause, so a
// DBA may add, drop, rename or retype the other columns, and retype a key
// column, without touching them (the agent notices the change at its next
// run). A partitioned (or inherited) table carries them on every table of
// its tree, because a statement on a partition fires only that partition's
// statement triggers.
package triggers

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// Schema is the source schema the queue and function live in; the
// replication role must own it.
const Schema = "mimeo"

// Layout is the version of the source objects Create renders. Layout 1
// (before mimeo 0.4.0) had a row trigger for key changes, whose WHEN clause
// kept the key columns from being retyped, no TRUNCATE trigger, and one
// queue column per source column for logdel.
const Layout = 2

// Reserved column names of the queue (a source key column must not use
// them). The queue has no serial and no index: every insert into it is on
// the writer's path, and replay needs neither.
const (
	ColClaimed   = "mimeo_claimed"
	ColTruncated = "mimeo_truncated"  // set (to when) on the entry a TRUNCATE queues; its keys are NULL
	ColRow       = "mimeo_row"        // logdel: the deleted row, as jsonb
	ColDeletedAt = "mimeo_deleted_at" // logdel: when it was deleted
)

// Column is a source column: its name and its format_type() text.
type Column struct {
	Name string
	Type string
}

// Spec describes one replicated table's source objects.
type Spec struct {
	Source ident.Name // the replicated source table
	Keys   []Column   // the key columns, with the source's types
	// Tables carry the triggers: Source and, when it is partitioned or
	// has children, every table of its tree. Empty means Source alone.
	Tables []ident.Name
	Logdel bool
	// Tag tells apart several destinations of one source table (a hash of
	// the destination's identity and table).
	Tag string
}

// Names are the source objects of one replicated table.
type Names struct {
	Queue    ident.Name
	Function ident.Name
	Insert   string // trigger names (the same on every table of the tree)
	Update   string
	Delete   string
	Truncate string
}

// Triggers lists the trigger names in a fixed order.
func (n Names) Triggers() []string { return []string{n.Insert, n.Update, n.Delete, n.Truncate} }

// Tag returns the short tag that keeps one destination's objects apart
// from another's for the same source table.
func Tag(destinationID, destTable string) string {
	sum := sha256.Sum256([]byte(destinationID + "\x00" + destTable))
	return hex.EncodeToString(sum[:4])
}

// Names derives the object names: <schema>_<table>_<tag>_q and so on,
// cut to 63 bytes deterministically.
func (s Spec) Names() Names {
	base := s.Source.Schema + "_" + s.Source.Table
	trig := "mimeo_" + s.Source.Table
	return Names{
		Queue:    ident.Name{Schema: Schema, Table: ident.Derive(base, "_"+s.Tag+"_q")},
		Function: ident.Name{Schema: Schema, Table: ident.Derive(base, "_"+s.Tag+"_fn")},
		Insert:   ident.Derive(trig, "_"+s.Tag+"_ins"),
		Update:   ident.Derive(trig, "_"+s.Tag+"_upd"),
		Delete:   ident.Derive(trig, "_"+s.Tag+"_del"),
		Truncate: ident.Derive(trig, "_"+s.Tag+"_trunc"),
	}
}

// Validate refuses key names that clash with the queue's own columns.
func (s Spec) Validate() error {
	if len(s.Keys) == 0 {
		return fmt.Errorf("%s: no key columns", s.Source)
	}
	for _, c := range s.Keys {
		switch c.Name {
		case ColClaimed, ColTruncated, ColRow, ColDeletedAt:
			return fmt.Errorf("%s: key column %q clashes with a column of mimeo's queue; give other key columns with p_pk_field", s.Source, c.Name)
		}
	}
	return nil
}

// QueueType is the type a key column of the given source type has in the
// queue: the widest of its kind (integers as bigint, varchar(n) as varchar,
// numeric(p,s) as numeric, ...), so that widening the key on the source
// (integer to bigint, say) never makes a write to the source fail.
func QueueType(sourceType string) string {
	t := strings.TrimSpace(sourceType)
	switch t {
	case "smallint", "integer", "bigint":
		return "bigint"
	}
	m := typmod.FindStringSubmatch(t)
	if m == nil {
		return t
	}
	switch m[1] {
	case "character":
		return "bpchar" + m[2] // blank-padded like the source column, whose index then serves the join
	case "character varying", "numeric", "timestamp", "time", "bit varying", "interval":
		return m[1] + m[2] // m[2]: " with time zone", "[]", ...
	}
	return t
}

// typmod matches a type with a modifier as format_type() prints it:
// "character varying(20)", "numeric(10,2)", "timestamp(3) with time zone".
var typmod = regexp.MustCompile(`^([a-z ]+?)\([0-9, ]+\)(.*)$`)

// Create returns the statements that create the queue, the function and
// the triggers, in order. Run them in one transaction.
func (s Spec) Create() []string {
	stmts := []string{s.queueDDL(), s.function()}
	for _, t := range s.tables() {
		stmts = append(stmts, s.Attach(t)...)
	}
	return stmts
}

// tables are the tables that carry the triggers.
func (s Spec) tables() []ident.Name {
	if len(s.Tables) == 0 {
		return []ident.Name{s.Source}
	}
	return s.Tables
}

func (s Spec) queueDDL() string {
	cols := []string{ident.Quote(ColClaimed) + " bigint"}
	for _, k := range s.Keys {
		cols = append(cols, ident.Quote(k.Name)+" "+QueueType(k.Type))
	}
	cols = append(cols, ident.Quote(ColTruncated)+" timestamptz")
	if s.Logdel {
		cols = append(cols, ident.Quote(ColRow)+" jsonb", ident.Quote(ColDeletedAt)+" timestamptz")
	}
	// mimeo_claimed holds the token of the batch that claimed an entry
	// (NULL while unclaimed), so a run only ever removes its own batch.
	return fmt.Sprintf("CREATE TABLE %s (%s)", s.Names().Queue.Sanitize(), strings.Join(cols, ", "))
}

// function is the trigger function: one set-based insert per statement.
// An update queues its new keys and, for the rows whose key it changed
// (PostgreSQL reports a row moved to another partition this way too), the
// old ones: logdel keeps what such a row and a deleted one held, as jsonb,
// which outlives any later change to the table's columns. A TRUNCATE
// queues a marker; for logdel it first keeps, as deletions, the values of
// the rows changed since the last replay (the destination has older ones),
// found through the queue so that the TRUNCATE costs what is pending, not
// what the table holds.
func (s Spec) function() string {
	n := s.Names()
	q := n.Queue.Sanitize()
	keys := strings.Join(quoteAll(s.Keys), ", ")
	okeys := prefixAll("o.", quoteAll(s.Keys))
	same := make([]string, len(s.Keys))
	for i, k := range quoteAll(s.Keys) {
		same[i] = "n." + k + " = o." + k
	}
	gone := fmt.Sprintf("INSERT INTO %s (%s) SELECT %s FROM old_rows o", q, keys, okeys)
	truncated := ""
	if s.Logdel {
		gone = fmt.Sprintf("INSERT INTO %s (%s, %s, %s) SELECT %s, to_jsonb(o), clock_timestamp() FROM old_rows o",
			q, keys, ident.Quote(ColRow), ident.Quote(ColDeletedAt), okeys)
		match := make([]string, len(s.Keys))
		for i, k := range quoteAll(s.Keys) {
			match[i] = "o." + k + " = k." + k
		}
		pending := fmt.Sprintf("INSERT INTO %s (%s, %s, %s) SELECT %s, to_jsonb(o), clock_timestamp() FROM (SELECT DISTINCT %s FROM %s WHERE %s IS NULL AND %s IS NULL) k JOIN \x00 o ON %s",
			q, keys, ident.Quote(ColRow), ident.Quote(ColDeletedAt), okeys, keys, q, ident.Quote(ColDeletedAt), ident.Quote(ColTruncated),
			strings.Join(match, " AND "))
		// format() reads % in the names as its own: double them, then put
		// in the truncated table's place.
		pending = strings.Replace(strings.ReplaceAll(pending, "%", "%%"), "\x00", "%s", 1)
		truncated = "EXECUTE format(" + quoteLiteral(pending) + ", TG_RELID::regclass);\n        "
	}
	return fmt.Sprintf(`CREATE FUNCTION %s() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $mimeo$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO %s (%s) SELECT %s FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO %s (%s) SELECT %s FROM new_rows;
        %s
            WHERE NOT EXISTS (SELECT 1 FROM new_rows n WHERE %s);
    ELSIF TG_OP = 'DELETE' THEN
        %s;
    ELSE
        %sINSERT INTO %s (%s) VALUES (clock_timestamp());
    END IF;
    RETURN NULL;
END
$mimeo$`, n.Function.Sanitize(),
		q, keys, keys,
		q, keys, keys,
		gone, strings.Join(same, " AND "),
		gone,
		truncated, q, ident.Quote(ColTruncated))
}

// Attach returns the statements that put the triggers on one table (the
// source table, or a partition of it); they run the existing function.
func (s Spec) Attach(table ident.Name) []string {
	n := s.Names()
	t, fn := table.Sanitize(), n.Function.Sanitize()
	return []string{
		fmt.Sprintf("CREATE TRIGGER %s AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()",
			ident.Quote(n.Insert), t, fn),
		fmt.Sprintf("CREATE TRIGGER %s AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()",
			ident.Quote(n.Update), t, fn),
		fmt.Sprintf("CREATE TRIGGER %s AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()",
			ident.Quote(n.Delete), t, fn),
		// BEFORE: logdel still sees the rows it keeps the last values of.
		fmt.Sprintf("CREATE TRIGGER %s BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()",
			ident.Quote(n.Truncate), t, fn),
	}
}

// QueueKeysOf returns the statement that queues the keys of every row one
// table of the tree holds itself (a partition that was attached, or
// written to directly, before it carried the triggers).
func (s Spec) QueueKeysOf(table ident.Name) string {
	keys := strings.Join(quoteAll(s.Keys), ", ")
	return fmt.Sprintf("INSERT INTO %s (%s) SELECT %s FROM ONLY %s",
		s.Names().Queue.Sanitize(), keys, keys, table.Sanitize())
}

// Drop returns the statements that remove the objects Create made; each
// tolerates an object already gone. DROP TRIGGER would need to own the
// source table; dropping the function (which the replication role owns)
// with CASCADE takes its triggers along, on every table that has them.
func (n Names) Drop() []string {
	return []string{
		fmt.Sprintf("DROP FUNCTION IF EXISTS %s() CASCADE", n.Function.Sanitize()),
		fmt.Sprintf("DROP TABLE IF EXISTS %s", n.Queue.Sanitize()),
	}
}

// UpgradeLayout1 returns the statements that turn layout-1 source objects
// into those of s, keeping every queued entry: drop the old function (and
// with it the old triggers), widen the queue's key columns, give it the
// TRUNCATE marker column and, for logdel, fold the deleted rows' value
// columns (queueColumns, the old queue's columns) into one jsonb column.
// Run them in one transaction: writers wait for it, and none is missed.
func (s Spec) UpgradeLayout1(oldFunction ident.Name, queueColumns []string) []string {
	q := s.Names().Queue.Sanitize()
	stmts := []string{fmt.Sprintf("DROP FUNCTION IF EXISTS %s() CASCADE", oldFunction.Sanitize())}
	alter := []string{"ADD COLUMN " + ident.Quote(ColTruncated) + " timestamptz"}
	for _, k := range s.Keys {
		qt := QueueType(k.Type)
		alter = append(alter, fmt.Sprintf("ALTER COLUMN %s TYPE %s USING %s::%s", ident.Quote(k.Name), qt, ident.Quote(k.Name), qt))
	}
	if s.Logdel {
		alter = append(alter, "ADD COLUMN "+ident.Quote(ColRow)+" jsonb")
	}
	stmts = append(stmts, "ALTER TABLE "+q+" "+strings.Join(alter, ", "))
	if s.Logdel {
		var pairs, drops []string
		for _, c := range queueColumns {
			if c == ColClaimed || c == ColDeletedAt {
				continue
			}
			pairs = append(pairs, quoteLiteral(c)+", "+ident.Quote(c))
			if !s.isKey(c) {
				drops = append(drops, "DROP COLUMN "+ident.Quote(c))
			}
		}
		stmts = append(stmts, fmt.Sprintf("UPDATE %s SET %s = jsonb_build_object(%s) WHERE %s IS NOT NULL",
			q, ident.Quote(ColRow), strings.Join(pairs, ", "), ident.Quote(ColDeletedAt)))
		if len(drops) > 0 {
			stmts = append(stmts, "ALTER TABLE "+q+" "+strings.Join(drops, ", "))
		}
	}
	stmts = append(stmts, s.function())
	for _, t := range s.tables() {
		stmts = append(stmts, s.Attach(t)...)
	}
	return stmts
}

func (s Spec) isKey(name string) bool {
	for _, k := range s.Keys {
		if k.Name == name {
			return true
		}
	}
	return false
}

func quoteAll(cols []Column) []string {
	out := make([]string, len(cols))
	for i, c := range cols {
		out[i] = ident.Quote(c.Name)
	}
	return out
}

func prefixAll(prefix string, quoted []string) string {
	out := make([]string, len(quoted))
	for i, q := range quoted {
		out[i] = prefix + q
	}
	return strings.Join(out, ", ")
}

// quoteLiteral quotes a string as an SQL literal (standard strings).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
