// Package triggers renders the source-side objects of dml and logdel
// replication: a queue table in the source's mimeo schema, a trigger
// function, and one statement-level trigger per event whose transition
// tables write the queue set-based. Every identifier is quoted, and every
// derived name fits PostgreSQL's 63-byte limit.
package triggers

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// Schema is the source schema the queue and function live in; the
// replication role must own it.
const Schema = "mimeo"

// Reserved column names of the queue (a source key column must not use
// them). The queue has no serial and no index: every insert into it is on
// the writer's path, and replay needs neither.
const (
	ColClaimed   = "mimeo_claimed"
	ColDeletedAt = "mimeo_deleted_at"
)

// Column is a source column: its name and its format_type() text.
type Column struct {
	Name string
	Type string
}

// Spec describes one replicated table's source objects.
type Spec struct {
	Source  ident.Name // the replicated source table
	Keys    []Column   // the key columns
	Columns []Column   // every copied column (logdel keeps deleted rows' values)
	Logdel  bool
	// Tag tells apart several destinations of one source table (a hash of
	// the destination's identity and table).
	Tag string
}

// Names are the source objects of one replicated table.
type Names struct {
	Queue     ident.Name
	Function  ident.Name
	Insert    string // trigger names (triggers live on the source table)
	Update    string
	Delete    string
	KeyChange string // row-level, fires only when an update changes a key
}

// Triggers lists the trigger names in a fixed order.
func (n Names) Triggers() []string { return []string{n.Insert, n.Update, n.Delete, n.KeyChange} }

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
	return Names{
		Queue:     ident.Name{Schema: Schema, Table: ident.Derive(base, "_"+s.Tag+"_q")},
		Function:  ident.Name{Schema: Schema, Table: ident.Derive(base, "_"+s.Tag+"_fn")},
		Insert:    ident.Derive("mimeo_"+s.Source.Table, "_"+s.Tag+"_ins"),
		Update:    ident.Derive("mimeo_"+s.Source.Table, "_"+s.Tag+"_upd"),
		Delete:    ident.Derive("mimeo_"+s.Source.Table, "_"+s.Tag+"_del"),
		KeyChange: ident.Derive("mimeo_"+s.Source.Table, "_"+s.Tag+"_key"),
	}
}

// Validate refuses key or column names that clash with the queue's own.
func (s Spec) Validate() error {
	if len(s.Keys) == 0 {
		return fmt.Errorf("%s: no key columns", s.Source)
	}
	cols := s.Keys
	if s.Logdel {
		cols = s.Columns
	}
	for _, c := range cols {
		switch c.Name {
		case ColClaimed, ColDeletedAt:
			return fmt.Errorf("%s: column %q clashes with a column of mimeo's queue; rename it or leave it out with p_filter", s.Source, c.Name)
		}
	}
	return nil
}

// Create returns the statements that create the queue, the function and
// the triggers, in order. Run them in one transaction.
func (s Spec) Create() []string {
	n := s.Names()
	var cols []string
	queued := s.Keys
	if s.Logdel {
		queued = mergeKeys(s.Keys, s.Columns)
	}
	for _, c := range queued {
		cols = append(cols, ident.Quote(c.Name)+" "+c.Type)
	}
	if s.Logdel {
		cols = append(cols, ident.Quote(ColDeletedAt)+" timestamptz")
	}
	// mimeo_claimed holds the token of the batch that claimed an entry
	// (NULL while unclaimed), so a run only ever removes its own batch.
	queue := fmt.Sprintf("CREATE TABLE %s (%s bigint, %s)",
		n.Queue.Sanitize(), ident.Quote(ColClaimed), strings.Join(cols, ", "))

	keys := quoteAll(s.Keys)
	keyList := strings.Join(keys, ", ")
	oldKeys := make([]string, len(keys))
	newKeys := make([]string, len(keys))
	for i, k := range keys {
		oldKeys[i], newKeys[i] = "OLD."+k, "NEW."+k
	}
	onDelete := fmt.Sprintf("INSERT INTO %s (%s) SELECT %s FROM old_rows;", n.Queue.Sanitize(), keyList, keyList)
	onKeyChange := fmt.Sprintf("INSERT INTO %s (%s) VALUES (%s);", n.Queue.Sanitize(), keyList, strings.Join(oldKeys, ", "))
	if s.Logdel {
		// logdel keeps what a deleted row held; a row whose key changed is,
		// under its old key, deleted too.
		all := quoteAll(queued)
		olds := make([]string, len(all))
		for i, c := range all {
			olds[i] = "OLD." + c
		}
		onDelete = fmt.Sprintf("INSERT INTO %s (%s, %s) SELECT %s, clock_timestamp() FROM old_rows;",
			n.Queue.Sanitize(), strings.Join(all, ", "), ident.Quote(ColDeletedAt), strings.Join(all, ", "))
		onKeyChange = fmt.Sprintf("INSERT INTO %s (%s, %s) VALUES (%s, clock_timestamp());",
			n.Queue.Sanitize(), strings.Join(all, ", "), ident.Quote(ColDeletedAt), strings.Join(olds, ", "))
	}
	// Statement level: one set-based insert per statement. An update queues
	// its new keys; the rare update that changes a key also fires the row
	// trigger (its WHEN is checked without calling the function) to queue
	// the old key.
	fn := fmt.Sprintf(`CREATE FUNCTION %s() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $mimeo$
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        %s
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO %s (%s) SELECT %s FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO %s (%s) SELECT %s FROM new_rows;
    ELSE
        %s
    END IF;
    RETURN NULL;
END
$mimeo$`, n.Function.Sanitize(),
		onKeyChange,
		n.Queue.Sanitize(), keyList, keyList,
		n.Queue.Sanitize(), keyList, keyList,
		onDelete)
	table := s.Source.Sanitize()
	return []string{
		queue,
		fn,
		fmt.Sprintf("CREATE TRIGGER %s AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()",
			ident.Quote(n.Insert), table, n.Function.Sanitize()),
		fmt.Sprintf("CREATE TRIGGER %s AFTER UPDATE ON %s REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()",
			ident.Quote(n.Update), table, n.Function.Sanitize()),
		fmt.Sprintf("CREATE TRIGGER %s AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()",
			ident.Quote(n.Delete), table, n.Function.Sanitize()),
		// No "UPDATE OF <keys>": a BEFORE trigger may change a key the
		// statement does not name.
		fmt.Sprintf("CREATE TRIGGER %s AFTER UPDATE ON %s FOR EACH ROW WHEN ((%s) IS DISTINCT FROM (%s)) EXECUTE FUNCTION %s()",
			ident.Quote(n.KeyChange), table, rowOf(oldKeys), rowOf(newKeys), n.Function.Sanitize()),
	}
}

// Drop returns the statements that remove the objects Create made; each
// tolerates an object already gone. DROP TRIGGER would need to own the
// source table; dropping the function (which the replication role owns)
// with CASCADE takes its triggers along, and the function's dependants are
// exactly those three triggers.
func (n Names) Drop() []string {
	return []string{
		fmt.Sprintf("DROP FUNCTION IF EXISTS %s() CASCADE", n.Function.Sanitize()),
		fmt.Sprintf("DROP TABLE IF EXISTS %s", n.Queue.Sanitize()),
	}
}

// rowOf makes a row constructor of one or more values, so that a single
// key compares as a row too.
func rowOf(vals []string) string {
	if len(vals) == 1 {
		return "ROW(" + vals[0] + ")"
	}
	return strings.Join(vals, ", ")
}

func quoteAll(cols []Column) []string {
	out := make([]string, len(cols))
	for i, c := range cols {
		out[i] = ident.Quote(c.Name)
	}
	return out
}

// mergeKeys lists the keys first, then the other columns.
func mergeKeys(keys, cols []Column) []Column {
	out := append([]Column(nil), keys...)
	for _, c := range cols {
		dup := false
		for _, k := range keys {
			if k.Name == c.Name {
				dup = true
			}
		}
		if !dup {
			out = append(out, c)
		}
	}
	return out
}
