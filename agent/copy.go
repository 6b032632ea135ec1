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
// dst through a pipe (see pipeRows).
func copyRows(ctx context.Context, src *pgconn.PgConn, srcSQL string, dst *pgconn.PgConn, dstSQL string) (int64, error) {
	var n int64
	err := pipeRows(ctx, src, srcSQL, func(in io.Reader) error {
		tag, err := dst.CopyFrom(ctx, in, dstSQL)
		if err != nil {
			return fmt.Errorf("write to destination: %w", err)
		}
		n = tag.RowsAffected()
		return nil
	})
	return n, err
}

// pipeRows runs a COPY ... TO STDOUT on src into a pipe that use reads at
// the same time: nothing is held in memory beyond one buffer. When either
// side fails the other is aborted, and the source's own failure is the one
// returned; a source connection aborted mid-COPY is closed by pgconn and
// dropped by its pool.
func pipeRows(ctx context.Context, src *pgconn.PgConn, sql string, use func(io.Reader) error) error {
	pr, pw := io.Pipe()
	srcDone := make(chan error, 1)
	go func() {
		err := copyOut(ctx, src, sql, pw)
		pw.CloseWithError(err) // nil means EOF for the reader
		srcDone <- err
	}()
	useErr := use(pr)
	// Unblock the source goroutine if the destination stopped reading.
	pr.CloseWithError(io.ErrClosedPipe)
	srcErr := <-srcDone
	switch {
	case srcErr != nil && !errors.Is(srcErr, io.ErrClosedPipe):
		return srcErr // the destination only failed because the source did
	case useErr != nil:
		return useErr
	}
	return srcErr
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
