package logical

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// Streaming (pgoutput protocol 2, streaming 'on', PostgreSQL 14 and later):
// the walsender sends a large transaction's changes while the source is
// still writing or decoding it, in blocks, instead of all at once after its
// commit. The applier folds and applies them in pieces inside one
// destination transaction as it does for a large transaction that was not
// streamed, and commits with the source's Stream Commit; so a catch-up's
// destination work starts while the walsender still decodes.
//
// Only the plain case is streamed: one streamed transaction at a time,
// nothing else committing meanwhile, into ready tables without a
// condition or the logdel flavour, whose copies it began after. Whatever
// else happens while one is open (another transaction, a subtransaction
// aborted, a failing piece, the stream idle for a second with it open)
// makes the stream start again without streaming (errUnstreamed), which
// sends that transaction again after its commit, the proven way. Nothing
// of it was committed on the destination, so nothing is lost or doubled.

// errUnstreamed ends a stream that is to start again without streaming.
var errUnstreamed = errors.New("stream restarts without streaming")

// unstreamed returns errUnstreamed, saying why.
func unstreamed(why string) error { return fmt.Errorf("%w: %s", errUnstreamed, why) }

// unstreamedFor is how long a source streams without streaming once it
// fell back.
const unstreamedFor = 10 * time.Minute

// streamIdleMax is how long a streamed transaction may stay open with
// nothing arriving before the stream falls back (its destination
// transaction would hold locks, and sync points wait, meanwhile).
const streamIdleMax = time.Second

// streamStart opens a block of a streamed transaction's changes.
type streamStart struct {
	xid   uint32
	first bool          // its first block
	lsn   pglogrepl.LSN // the first block: where the transaction's first change was written
}

// streamStop closes a block.
type streamStop struct{}

// canStream reports whether a source server of this version streams
// transactions in progress (protocol 2 needs PostgreSQL 14).
func canStream(serverVersion string) bool {
	major, _, _ := strings.Cut(strings.TrimSpace(serverVersion), ".")
	n, err := strconv.Atoi(strings.TrimRightFunc(major, func(r rune) bool { return r < '0' || r > '9' }))
	return err == nil && n >= 14
}

// startStreaming asks the walsender to stream a transaction once it holds
// decodingMem bytes (logical_decoding_work_mem, 64 MB by default, would
// stream only very large ones), and returns the plugin arguments.
func startStreaming(ctx context.Context, repl *pgconn.PgConn, decodingMem int) ([]string, error) {
	kb := max(decodingMem>>10, 64) // the least the server takes
	if err := repl.Exec(ctx, "SET logical_decoding_work_mem = '"+strconv.Itoa(kb)+"kB'").Close(); err != nil {
		return nil, fmt.Errorf("set logical_decoding_work_mem: %w", err)
	}
	return []string{"proto_version '2'", "streaming 'on'"}, nil
}

// parseV2 parses a protocol 2 message other than a row change, giving the
// types the applier takes for what protocol 1 also has.
func parseV2(data []byte, inStream bool, at pglogrepl.LSN) (any, error) {
	msg, err := pglogrepl.ParseV2(data, inStream)
	if err != nil {
		return nil, err
	}
	switch m := msg.(type) {
	case *pglogrepl.RelationMessageV2:
		return &m.RelationMessage, nil
	case *pglogrepl.TruncateMessageV2:
		return &m.TruncateMessage, nil
	case *pglogrepl.StreamStartMessageV2:
		return &streamStart{xid: m.Xid, first: m.FirstSegment == 1, lsn: at}, nil
	case *pglogrepl.StreamStopMessageV2:
		return streamStop{}, nil
	}
	return msg, nil
}

// streamStart handles the start of a streamed block.
func (r *runner) streamStart(ctx context.Context, m *streamStart) error {
	r.lastData = time.Now()
	switch {
	case r.cur != nil:
		return errors.New("pgoutput started a streamed block inside a transaction")
	case r.stx == nil && m.first:
		r.stx = &txn{streamed: true, xid: m.xid, firstLSN: m.lsn}
	case r.stx == nil || r.stx.xid != m.xid || m.first:
		return unstreamed("two source transactions are streamed at once")
	}
	r.cur = r.stx
	return nil
}

// streamStop handles the end of a streamed block.
func (r *runner) streamStop() { r.cur = nil }

// abandon rolls back the destination transaction of a streamed transaction
// applied in pieces, if it has one (what its pieces did is moot).
func (r *runner) abandon(ctx context.Context) {
	if r.large {
		_ = r.a.settle()
		r.a.rollback(ctx)
		r.large = false
	}
}

// streamAbort handles a streamed transaction's (or subtransaction's)
// rollback on the source.
func (r *runner) streamAbort(ctx context.Context, m *pglogrepl.StreamAbortMessageV2) error {
	if r.stx == nil || r.stx.xid != m.Xid {
		return nil // not one this stream holds
	}
	if m.SubXid != m.Xid {
		// Its changes cannot be told from the rest's.
		return unstreamed("a subtransaction of a streamed transaction was rolled back")
	}
	r.abandon(ctx)
	r.a.s.log.Debug("a streamed source transaction was rolled back", "xid", m.Xid)
	r.stx, r.cur = nil, nil
	return nil
}

// streamCommit handles a streamed transaction's commit: from here on it is
// applied as any transaction is once its commit arrives.
func (r *runner) streamCommit(ctx context.Context, m *pglogrepl.StreamCommitMessageV2, more bool) error {
	done := r.stx
	if done == nil || done.xid != m.Xid || r.cur != nil {
		return fmt.Errorf("pgoutput committed streamed transaction %d, which it did not stream", m.Xid)
	}
	r.stx = nil
	done.commitLSN = m.CommitLSN
	if done.commitLSN < r.a.applied {
		r.abandon(ctx) // applied before a restart
		return nil
	}
	if r.large {
		moved, err := r.a.targetsMoved(ctx)
		if err != nil {
			return r.a.failed(ctx, err)
		}
		if moved {
			r.abandon(ctx)
			return unstreamed("a table the streamed transaction went to was made, repulled or changed meanwhile")
		}
	}
	return r.committed(ctx, done, m.TransactionEndLSN, m.CommitTime, more)
}

// targetsMoved reports whether the tables a streamed transaction's pieces
// went to (read at its first piece, before the source committed it) are
// still those its relations have now.
func (a *applier) targetsMoved(ctx context.Context) (bool, error) {
	if err := a.settle(); err != nil {
		return false, err
	}
	for rel, was := range a.targets {
		now, err := readTargets(ctx, a.tx, a.s.dblink, ident.Name{Schema: rel.schema, Table: rel.table})
		if err != nil {
			return false, err
		}
		if len(now) != len(was) {
			return true, nil
		}
		for i, c := range now {
			w := was[i].cfg
			if c.destText != w.destText || c.state != w.state || c.startLSN != w.startLSN {
				return true, nil
			}
		}
	}
	return false, nil
}

// streamIdle makes the stream fall back when a streamed transaction is open
// and nothing has arrived for streamIdleMax.
func (r *runner) streamIdle() error {
	if r.stx != nil && time.Since(r.lastData) >= streamIdleMax {
		return unstreamed("a streamed source transaction stays open")
	}
	return nil
}

// streamable reports, for a piece of a streamed transaction (its commit
// not known yet), whether tg may take it now.
func streamable(t *txn, tg *target) error {
	c := tg.cfg
	switch {
	case c.state != "ready":
		return unstreamed(c.destText + " is not ready")
	case c.logdel || c.condition != "":
		return unstreamed(c.destText + " keeps deleted rows or has a condition")
	case t.firstLSN < c.startLSN:
		return unstreamed(c.destText + " was copied while the transaction was open")
	}
	return nil
}
