package agent

import (
	"context"
	"fmt"
	"regexp"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/triggers"
)

// queuedBatch is a batch of queue entries in flight: those with a row
// address in (from, to], as a source transaction saw them; the same
// transaction removes them once the destination committed the batch.
type queuedBatch struct {
	tx       pgx.Tx
	from, to string // tid literals
	entries  int64
	rows     *spool // each key of the batch with its current row, if any
	deleted  *spool // logdel: the last deletion queued for each key
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
// applies batch n. A producer reads each batch in a source transaction of
// its own (repeatable read, on two connections in turn): the next entries
// in row address order, and for their keys the source's current rows,
// spooled. The destination applies each batch in its own transaction, in
// order; only then does the batch's source transaction delete exactly the
// entries it read, and commit. The queue needs no claim written to it. A
// crash in between rolls the source transaction back: the entries stay
// for the next run, which applies them again from the source's current
// rows, which is idempotent.
func (a *Agent) replayBatches(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, limit int) (int, error) {
	second, _, err := a.sources.acquire(ctx, r.dst, cfg.Dblink)
	if err != nil {
		return 0, err
	}
	defer second.Release()
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batches := make(chan *queuedBatch, 1)
	committed := make(chan struct{}, 2)
	produced := make(chan error, 1)
	go func() {
		produced <- produceQueued(pctx, [2]*pgxpool.Conn{src, second}, cfg, st, limit, batches, committed)
	}()

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
		committed <- struct{}{}
		total += rows
		n++
		if r.debug {
			r.note(ctx, "Batch", fmt.Sprintf("batch %d: %d queued changes, %d rows", n, b.entries, rows), false)
		}
	}
	if err := <-produced; err != nil {
		return n, err
	}
	return n, nil
}

// tidStart is the row address before every other.
const tidStart = "(0,0)"

// tidLiteral matches a row address as tidout writes it.
var tidLiteral = regexp.MustCompile(`^\(\d+,\d+\)$`)

// entriesIn is the condition on queue entries (aliased alias, or "") of a
// batch: row address in (from, to], not a TRUNCATE marker (those are
// pruneVanished's).
func entriesIn(alias, from, to string) string {
	return alias + "ctid > '" + from + "'::tid AND " + alias + "ctid <= '" + to + "'::tid AND " +
		alias + ident.Quote(triggers.ColTruncated) + " IS NULL"
}

// produceQueued is replayBatches' source side; it closes batches when the
// queue is empty (or on failure), and returns once every batch it sent
// has been removed from the queue or rolled back.
func produceQueued(ctx context.Context, conns [2]*pgxpool.Conn, cfg *queueConfig, st *sourceTable, limit int,
	batches chan<- *queuedBatch, committed <-chan struct{}) error {
	defer close(batches)
	q := cfg.Names.Queue.Sanitize()
	// open: the batch sent and not yet removed.
	var open *queuedBatch
	defer func() {
		if open != nil {
			_ = open.tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	removeOpen := func() error {
		if open == nil {
			return nil
		}
		select {
		case <-committed:
		case <-ctx.Done():
			return ctx.Err()
		}
		if _, err := open.tx.Exec(ctx, "DELETE FROM "+q+" WHERE "+entriesIn("", open.from, open.to)); err != nil {
			return fmt.Errorf("remove applied queue entries: %w", err)
		}
		if err := open.tx.Commit(ctx); err != nil {
			return fmt.Errorf("remove applied queue entries: %w", err)
		}
		open = nil
		return nil
	}
	from := tidStart
	for i := 0; ; i++ {
		tx, err := conns[i%2].BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadWrite})
		if err != nil {
			return fmt.Errorf("read queued changes: %w", err)
		}
		b := &queuedBatch{tx: tx, from: from}
		var to *string
		if err := tx.QueryRow(ctx, "SELECT count(*), max(ctid)::text FROM (SELECT ctid FROM "+q+" WHERE ctid > $1::tid AND "+
			ident.Quote(triggers.ColTruncated)+" IS NULL LIMIT $2) e", from, limit).Scan(&b.entries, &to); err != nil {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			return fmt.Errorf("read queued changes: %w", err)
		}
		if b.entries == 0 {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			if err := removeOpen(); err != nil {
				return err
			}
			if from == tidStart {
				return nil // the whole queue is empty
			}
			// Past the last entry: look again from the start, for
			// entries written since into space freed before.
			from = tidStart
			continue
		}
		if !tidLiteral.MatchString(*to) {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			return fmt.Errorf("read queued changes: unexpected row address %q", *to)
		}
		b.to = *to
		b.rows = newSpool()
		if cfg.Type != "dml" {
			b.deleted = newSpool()
		}
		select {
		case batches <- b:
		case <-ctx.Done():
			_ = tx.Rollback(context.WithoutCancel(ctx))
			return ctx.Err()
		}
		pg := tx.Conn().PgConn()
		err = spoolCopy(ctx, pg, queuedRowsSQL(cfg, st, entriesIn("", b.from, b.to)), b.rows)
		if err == nil && b.deleted != nil {
			err = spoolCopy(ctx, pg, deletionsSQL(cfg, st, entriesIn("q.", b.from, b.to)+" AND "), b.deleted)
		} else if b.deleted != nil {
			b.deleted.closeWrite(err)
		}
		if err != nil {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			return err
		}
		// The batch before this one goes from the queue once committed.
		if err := removeOpen(); err != nil {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			return err
		}
		open, from = b, b.to
	}
}
