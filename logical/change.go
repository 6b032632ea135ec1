package logical

import (
	"time"

	"github.com/jackc/pglogrepl"
)

// relation is a source table as pgoutput describes it (a Relation message).
type relation struct {
	id      uint32
	schema  string
	table   string
	columns []relColumn
}

// relColumn is one column of a relation.
type relColumn struct {
	name   string
	typeID uint32
	typmod int32
	key    bool // part of the replica identity
}

// columnIndex returns the position of the column called name, or -1.
func (r *relation) columnIndex(name string) int {
	for i, c := range r.columns {
		if c.name == name {
			return i
		}
	}
	return -1
}

// Change kinds.
const (
	opInsert   = 'I'
	opUpdate   = 'U'
	opDelete   = 'D'
	opTruncate = 'T'
)

// change is one row change of a source transaction, its tuples in the
// relation's column order. A nil value is NULL; unchanged[i] marks a
// TOASTed value pgoutput left out because the UPDATE did not change it.
type change struct {
	op        byte
	rel       *relation
	old       []*string // UPDATE with a changed key or REPLICA IDENTITY FULL, DELETE: the old key (or row)
	new       []*string // INSERT, UPDATE
	unchanged []bool    // UPDATE: new values not sent
}

// txn is one source transaction as it arrives.
type txn struct {
	commitLSN pglogrepl.LSN // from BEGIN: the commit record's position
	endLSN    pglogrepl.LSN // from COMMIT: where the next transaction may start
	commitAt  time.Time
	changes   []change
	size      int  // bytes of values held, for the memory budget
	skip      bool // applied already (before a restart)

	// A streamed transaction (protocol 2) arrives before it commits:
	// commitLSN and commitAt are known only at its Stream Commit.
	streamed bool
	xid      uint32
	firstLSN pglogrepl.LSN // where its first change was written
}
