package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5/pgconn"
)

// copyBufferSize batches the source's per-row COPY messages into large
// writes to the destination, so the pipe does not cost a syscall per row.
const copyBufferSize = 256 << 10

// copyRows streams a COPY ... TO STDOUT on src into a COPY ... FROM STDIN on
// dst through a pipe: nothing is held in memory beyond one buffer. When
// either side fails the other is aborted; a source connection aborted
// mid-COPY is closed by pgconn and dropped by its pool.
func copyRows(ctx context.Context, src *pgconn.PgConn, srcSQL string, dst *pgconn.PgConn, dstSQL string) (int64, error) {
	pr, pw := io.Pipe()
	srcDone := make(chan error, 1)
	go func() {
		err := copyOut(ctx, src, srcSQL, pw)
		pw.CloseWithError(err) // nil means EOF for the reader
		srcDone <- err
	}()
	tag, dstErr := dst.CopyFrom(ctx, pr, dstSQL)
	// Unblock the source goroutine if the destination stopped reading.
	pr.CloseWithError(io.ErrClosedPipe)
	srcErr := <-srcDone
	switch {
	case srcErr != nil && !errors.Is(srcErr, io.ErrClosedPipe):
		return 0, srcErr // the destination only failed because the source did
	case dstErr != nil:
		return 0, fmt.Errorf("write to destination: %w", dstErr)
	case srcErr != nil:
		return 0, srcErr
	}
	return tag.RowsAffected(), nil
}

// copyOut runs a COPY ... TO STDOUT on src into w, in writes of
// copyBufferSize (not one per row).
func copyOut(ctx context.Context, src *pgconn.PgConn, sql string, w io.Writer) error {
	bw := bufio.NewWriterSize(w, copyBufferSize)
	_, err := src.CopyTo(ctx, bw, sql)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return fmt.Errorf("read from source: %w", err)
	}
	return nil
}
