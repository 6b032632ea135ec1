package logical

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// batchMax is the most messages handed to the applier at once.
const batchMax = 256

// ackGap is the least time between two acknowledgements sent because the
// destination committed more.
const ackGap = 20 * time.Millisecond

// marker is a keepalive's position, passed on between transactions: when
// the applier has applied everything before it, the slot may be
// acknowledged up to it (the source wrote only other tables' changes).
type marker struct{ lsn pglogrepl.LSN }

// receive reads the replication connection and hands decoded messages to
// out in order, in batches. It alone uses the connection: it also
// acknowledges the slot, every StatusInterval and when the server asks,
// with flush and apply set to what the destination has committed
// (s.acked).
func (s *stream) receive(ctx context.Context, out *handover) error {
	var (
		inTxn      bool // between BEGIN and COMMIT, or in a streamed block
		inStream   bool // in a streamed block: messages carry a transaction id
		nextStatus time.Time
		sentAt     time.Time
	)
	status := func(reply bool) error {
		now := time.Now()
		nextStatus, sentAt = now.Add(s.e.cfg.StatusInterval), now
		return s.sendStatus(ctx, reply, statusTimeout)
	}
	// Messages go to the applier in batches (a hand-over per message
	// costs more than decoding it): a batch is handed over when full, at a
	// commit or keepalive, and when a read window passes without data.
	var batch []any
	// flush hands the batch on, acknowledging meanwhile if the applier is
	// slow (one ticker for that, not a timer per hand-over).
	slow := time.NewTicker(s.e.cfg.StatusInterval)
	defer slow.Stop()
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		b := batch
		batch = nil
		return out.put(ctx, b, slow.C, func() error {
			if err := status(false); err != nil {
				return fmt.Errorf("acknowledge slot: %w", err)
			}
			return nil
		})
	}
	send := func(msg any, now bool) error {
		batch = append(batch, msg)
		if now || len(batch) >= batchMax {
			return flush()
		}
		return nil
	}
	// One read deadline for many reads (a context per read costs a timer
	// and a watcher each): the receiver wakes at least every 100 ms to
	// acknowledge when due, and to notice ctx's end.
	conn := s.repl.Conn()
	var wake time.Time
	defer func() { _ = conn.SetReadDeadline(time.Time{}) }()
	for unchecked := 0; ; unchecked++ {
		// Acknowledged when due, when the walsender asks, and after the
		// destination committed more (checked after each hand-over, every
		// 64 messages, and at least every 100 ms; a clock read per
		// message cost 5 % of the agent's CPU): the slot's restart point
		// then follows (a restarted walsender decodes less again), and
		// the source may recycle that WAL.
		if reply := s.replyQ.Swap(false); reply || len(batch) == 0 || unchecked >= 64 {
			unchecked = 0
			if now := time.Now(); reply || now.After(nextStatus) ||
				(pglogrepl.LSN(s.acked.Load()) > s.sentAck && now.Sub(sentAt) >= ackGap) {
				if err := status(reply); err != nil {
					return fmt.Errorf("acknowledge slot: %w", err)
				}
			}
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		if wake.IsZero() {
			wake = time.Now().Add(100 * time.Millisecond)
			if err := conn.SetReadDeadline(wake); err != nil {
				return fmt.Errorf("receive from slot: %w", err)
			}
		}
		raw, err := s.repl.ReceiveMessage(context.Background())
		if err != nil {
			wake = time.Time{}
			if pgconn.Timeout(err) && ctx.Err() == nil {
				if err := flush(); err != nil {
					return err
				}
				continue
			}
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return fmt.Errorf("receive from slot: %w", err)
		}
		var data []byte
		switch m := raw.(type) {
		case *pgproto3.CopyData:
			data = m.Data
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("slot %s: %w", s.names.Slot, pgconn.ErrorResponseToPgError(m))
		default:
			continue
		}
		if len(data) == 0 {
			continue
		}
		switch data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			k, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
			if err != nil {
				return fmt.Errorf("parse keepalive: %w", err)
			}
			// Passed on unless behind what the destination has (the
			// applier may have let an earlier one go unstored; one at the
			// same place still says the stream is current).
			if !inTxn && k.ServerWALEnd >= pglogrepl.LSN(s.acked.Load()) {
				s.received = max(s.received, k.ServerWALEnd)
				if err := send(marker{lsn: k.ServerWALEnd}, true); err != nil {
					return err
				}
			}
			if k.ReplyRequested {
				nextStatus = time.Time{}
			}
		case pglogrepl.XLogDataByteID:
			x, err := pglogrepl.ParseXLogData(data[1:])
			if err != nil {
				return fmt.Errorf("parse WAL data: %w", err)
			}
			var msg any
			switch {
			case isRowMessage(x.WALData):
				msg, err = decodeRowAt(x.WALData, inStream)
			case s.streaming:
				msg, err = parseV2(x.WALData, inStream, x.WALStart)
			default:
				msg, err = pglogrepl.Parse(x.WALData)
			}
			if err != nil {
				return fmt.Errorf("decode pgoutput message at %s: %w", x.WALStart, err)
			}
			commit := false
			switch m := msg.(type) {
			case *pglogrepl.BeginMessage:
				inTxn = true
			case *pglogrepl.CommitMessage:
				inTxn, commit = false, true
				s.received = max(s.received, m.TransactionEndLSN)
			case *streamStart:
				inTxn, inStream = true, true
			case streamStop:
				inTxn, inStream, commit = false, false, true
			case *pglogrepl.StreamCommitMessageV2:
				commit = true
				s.received = max(s.received, m.TransactionEndLSN)
			case *pglogrepl.StreamAbortMessageV2:
				commit = true
			}
			if err := send(msg, commit); err != nil {
				return err
			}
		}
	}
}

// statusTimeout bounds the write of one status update (pglogrepl's
// ignores its context): a socket that takes no 40 bytes for that long
// ends the stream, which then starts again.
const statusTimeout = 10 * time.Second

// sendStatus acknowledges the slot up to what the destination has
// committed (s.acked); write is what has been received.
func (s *stream) sendStatus(ctx context.Context, reply bool, timeout time.Duration) error {
	acked := pglogrepl.LSN(s.acked.Load())
	conn := s.repl.Conn()
	if err := conn.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	defer func() { _ = conn.SetWriteDeadline(time.Time{}) }()
	err := pglogrepl.SendStandbyStatusUpdate(ctx, s.repl, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: max(s.received, acked),
		WALFlushPosition: acked,
		WALApplyPosition: acked,
		ReplyRequested:   reply,
	})
	if err == nil {
		s.sentAck = acked
	}
	return err
}
