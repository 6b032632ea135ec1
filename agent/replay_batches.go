package agent

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/triggers"
)

// queuedBatch is a batch of queue entries in flight: those with a row
// address in (from, to], as one source snapshot saw them.
type queuedBatch struct {
	from, to string       // tid literals
	tids     []pgtype.TID // the entries read, removed once the batch committed
	filenode uint32       // the queue's file when they were read
	rows     *spool       // each key of the batch with its current row, if any
	deleted  *spool       // logdel: the last deletion queued for each key
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
// applies batch n. A producer on the source connection reads each batch
// in a short repeatable-read transaction: the next entries in row address
// order, and for their keys the source's current rows, spooled (to disk
// past spoolMemory, so the source never waits for the destination). The
// destination applies each batch in its own transaction, in order; only
// then are exactly the entries read removed from the queue (an entry
// written since is not among them). The queue needs no claim written to
// it. A crash in between leaves the entries queued: the next run applies
// them again from the source's current rows, which is idempotent.
func (a *Agent) replayBatches(ctx context.Context, r *run, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, limit int) (int, error) {
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batches := make(chan *queuedBatch, 1)
	committed := make(chan struct{}, 2)
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
		committed <- struct{}{}
		total += rows
		n++
		if r.debug {
			r.note(ctx, "Batch", fmt.Sprintf("batch %d: %d queued changes, %d rows", n, len(b.tids), rows), false)
		}
	}
	if err := <-produced; err != nil {
		return n, err
	}
	return n, nil
}

// tidStart is the row address before every other.
const tidStart = "(0,0)"

// entriesIn is the condition on queue entries (aliased alias, or "") of a
// batch: row address in (from, to], not a TRUNCATE marker (those are
// pruneVanished's).
func entriesIn(alias, from, to string) string {
	return alias + "ctid > '" + from + "'::tid AND " + alias + "ctid <= '" + to + "'::tid AND " +
		alias + ident.Quote(triggers.ColTruncated) + " IS NULL"
}

// tidText is a row address as a tid literal.
func tidText(t pgtype.TID) string { return fmt.Sprintf("(%d,%d)", t.BlockNumber, t.OffsetNumber) }

// produceQueued is replayBatches' source side; it closes batches when the
// queue is empty (or on failure), and returns once every batch it sent
// has been removed from the queue, or left there.
func produceQueued(ctx context.Context, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, limit int,
	batches chan<- *queuedBatch, committed <-chan struct{}) error {
	defer close(batches)
	q := cfg.Names.Queue.Sanitize()
	// open: the batch sent and not yet removed.
	var open *queuedBatch
	removeOpen := func() error {
		if open == nil {
			return nil
		}
		select {
		case <-committed:
		case <-ctx.Done():
			return ctx.Err()
		}
		b := open
		open = nil
		return removeEntries(ctx, src, q, b)
	}
	from := tidStart
	for {
		b, err := readBatch(ctx, src, cfg, st, from, limit, batches)
		if err != nil {
			return err
		}
		if b == nil {
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
		// The batch before this one goes from the queue once committed.
		if err := removeOpen(); err != nil {
			return err
		}
		open, from = b, b.to
	}
}

// readBatch reads the next batch after from in one repeatable-read source
// transaction, hands it to batches and spools its rows; nil when no entry
// is left after from.
func readBatch(ctx context.Context, src *pgxpool.Conn, cfg *queueConfig, st *sourceTable, from string, limit int,
	batches chan<- *queuedBatch) (*queuedBatch, error) {
	q := cfg.Names.Queue.Sanitize()
	tx, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("read queued changes: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	b := &queuedBatch{from: from}
	if err := tx.QueryRow(ctx, `SELECT pg_relation_filenode($1::regclass)::oid`, q).Scan(&b.filenode); err != nil {
		return nil, fmt.Errorf("read queued changes: %w", err)
	}
	if b.tids, b.to, err = batchEntries(ctx, tx, q, from, limit); err != nil {
		return nil, fmt.Errorf("read queued changes: %w", err)
	}
	if len(b.tids) == 0 {
		return nil, nil
	}
	b.rows = newSpool()
	if cfg.Type != "dml" {
		b.deleted = newSpool()
	}
	select {
	case batches <- b:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	// In the same snapshot, the entries in (from, to] are exactly b.tids.
	pg := tx.Conn().PgConn()
	err = spoolCopy(ctx, pg, queuedRowsSQL(cfg, st, entriesIn("", b.from, b.to)), b.rows)
	if b.deleted != nil {
		if err == nil {
			err = spoolCopy(ctx, pg, deletionsSQL(cfg, st, entriesIn("q.", b.from, b.to)+" AND "), b.deleted)
		} else {
			b.deleted.closeWrite(err)
		}
	}
	if err != nil {
		return nil, err
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("read queued changes: %w", err)
	}
	return b, nil
}

// batchEntries reads, in the read transaction tx, the next at most limit
// entries of queue q after from, and the row address of the last: they
// must be exactly the entries in (from, to], as the batch's rows are read
// by that range and its entries removed by those addresses. A LIMIT alone
// does not promise the first entries in address order (a parallel or
// synchronized scan starts elsewhere in the table, and then entries of the
// range would be applied but stay queued), so the scan is kept serial and
// the range counted; should it hold more, the first limit entries of the
// range are read in address order instead.
func batchEntries(ctx context.Context, tx pgx.Tx, q, from string, limit int) ([]pgtype.TID, string, error) {
	if _, err := tx.Exec(ctx, `SELECT set_config('max_parallel_workers_per_gather', '0', true), set_config('synchronize_seqscans', 'off', true)`); err != nil {
		return nil, "", err
	}
	notMarker := ident.Quote(triggers.ColTruncated) + " IS NULL"
	read := func(sql string, args ...any) ([]pgtype.TID, error) {
		rows, err := tx.Query(ctx, sql, args...)
		if err != nil {
			return nil, err
		}
		return pgx.CollectRows(rows, pgx.RowTo[pgtype.TID])
	}
	tids, err := read("SELECT ctid FROM "+q+" WHERE ctid > $1::tid AND "+notMarker+" LIMIT $2", from, limit)
	if err != nil || len(tids) == 0 {
		return nil, "", err
	}
	last := tids[0]
	for _, t := range tids[1:] {
		if tidAfter(t, last) {
			last = t
		}
	}
	to := tidText(last)
	var inRange int
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM "+q+" WHERE "+entriesIn("", from, to)).Scan(&inRange); err != nil {
		return nil, "", err
	}
	if inRange == len(tids) {
		return tids, to, nil
	}
	if tids, err = read("SELECT ctid FROM "+q+" WHERE "+entriesIn("", from, to)+" ORDER BY ctid LIMIT $1", limit); err != nil {
		return nil, "", err
	}
	return tids, tidText(tids[len(tids)-1]), nil
}

// tidAfter reports whether row address a comes after b.
func tidAfter(a, b pgtype.TID) bool {
	return a.BlockNumber > b.BlockNumber || (a.BlockNumber == b.BlockNumber && a.OffsetNumber > b.OffsetNumber)
}

// removeEntries deletes a committed batch's entries from the queue by row
// address. The queue's file must be the one they were read from: a VACUUM
// FULL, CLUSTER or TRUNCATE of the queue since may have put other entries
// at those addresses, and then the entries stay, to be applied again.
func removeEntries(ctx context.Context, src *pgxpool.Conn, q string, b *queuedBatch) error {
	err := func() error {
		tx, err := beginWrite(ctx, src)
		if err != nil {
			return err
		}
		defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
		// The lock keeps the queue's file from changing until the commit.
		if _, err := tx.Exec(ctx, "LOCK TABLE "+q+" IN ROW EXCLUSIVE MODE"); err != nil {
			return err
		}
		var same bool
		if err := tx.QueryRow(ctx, `SELECT pg_relation_filenode($1::regclass)::oid = $2`, q, b.filenode).Scan(&same); err != nil {
			return err
		}
		if !same {
			return nil
		}
		if _, err := tx.Exec(ctx, "DELETE FROM "+q+" WHERE ctid = ANY($1::tid[])", b.tids); err != nil {
			return err
		}
		return tx.Commit(ctx)
	}()
	if err != nil {
		return fmt.Errorf("remove applied queue entries: %w", err)
	}
	return nil
}
