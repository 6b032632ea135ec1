package agent

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// queuedBatch is a batch of queue entries in flight: claimed on the source
// under its token, its rows spooled for the destination.
type queuedBatch struct {
	token   int64
	claimed int64
	rows    *spool // each claimed key with its current row, if any
	deleted *spool // logdel: the last deletion queued for each key
}

// closeRead lets the producer of the batch's spools stop.
func (b *queuedBatch) closeRead() {
	b.rows.closeRead()
	if b.deleted != nil {
		b.deleted.closeRead()
	}
}

// replayBatches replays the queue until it is empty, and returns how many
// batches it applied. The source reads batch n+1 while the destination
// applies batch n: a producer on the source connection claims a batch and
// spools its rows, then removes the entries of the batch before it once
// the destination has committed that one; the destination applies each
// batch in its own transaction, in order. Entries are only ever removed
// after their batch committed; a crash leaves them, claimed, for the next
// run, which applies them again from the source's current rows.
func (a *Agent) replayBatches(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, limit int) (int, error) {
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batches := make(chan *queuedBatch, 1)
	committed := make(chan int64, 2)
	produced := make(chan error, 1)
	go func() { produced <- produceQueued(pctx, src, cfg, st, limit, batches, committed) }()

	var total int64
	n := 0
	for b := range batches {
		var rows int64
		err := withTx(ctx, r.dst, func(tx pgx.Tx) error {
			var err error
			rows, err = applyQueued(ctx, tx, cfg, st, r.dest, b.rows, b.deleted)
			return err
		})
		if err == nil {
			r.committed = total + rows
			err = a.fault(faultAfterDestCommit)
		}
		if err != nil {
			if perr := stopProducer(cancel, batches, produced, b); perr != nil {
				return n, perr // the destination only failed because the source did
			}
			return n, fmt.Errorf("apply batch %d: %w", n+1, err)
		}
		committed <- b.token
		total += rows
		n++
		if r.debug {
			r.note(ctx, "Batch", fmt.Sprintf("batch %d: %d queued changes, %d rows", n, b.claimed, rows), false)
		}
	}
	if err := <-produced; err != nil {
		return n, err
	}
	return n, nil
}

// produceQueued is replayBatches' source side; it closes batches when the
// queue is empty (or on failure), and returns once every batch it sent has
// either been removed from the queue or given up.
func produceQueued(ctx context.Context, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, limit int,
	batches chan<- *queuedBatch, committed <-chan int64) error {
	defer close(batches)
	// sent: the token of the batch sent and not yet removed, 0 for none.
	var sent int64
	removeSent := func() error {
		if sent == 0 {
			return nil
		}
		select {
		case token := <-committed:
			sent = 0
			return removeBatch(ctx, src, cfg, token)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for first := true; ; first = false {
		// Each batch has a token of its own: a run only ever removes the
		// entries it claimed itself.
		token := newToken()
		claimed, err := claimBatch(ctx, src, cfg, limit, token, first)
		if err != nil {
			return fmt.Errorf("claim queued changes: %w", err)
		}
		if claimed == 0 {
			return removeSent()
		}
		b := &queuedBatch{token: token, claimed: claimed, rows: newSpool()}
		if cfg.Type != "dml" {
			b.deleted = newSpool()
		}
		select {
		case batches <- b:
		case <-ctx.Done():
			return ctx.Err()
		}
		err = spoolCopy(ctx, src.Conn().PgConn(), queuedRowsSQL(cfg, st, token), b.rows)
		if err == nil && b.deleted != nil {
			err = spoolCopy(ctx, src.Conn().PgConn(), deletionsSQL(cfg, st, "q."+claimedBy(token)+" AND "), b.deleted)
		} else if b.deleted != nil {
			b.deleted.closeWrite(err)
		}
		if err != nil {
			return err
		}
		// The batch before this one: gone from the queue once committed.
		if err := removeSent(); err != nil {
			return err
		}
		sent = token
	}
}
