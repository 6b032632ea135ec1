package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/jackc/pgx/v5/pgconn"
)

// spoolChunks bounds a spool: this many writes of copyBufferSize (16 MB)
// may wait for the reader before the writer blocks.
const spoolChunks = 64

// spool is a pipe with a bounded buffer. A source COPY written into it
// runs ahead of the destination reading it, up to spoolChunks writes: the
// next batch is read from the source while the destination applies this
// one, and a batch larger than that streams as through a plain pipe.
type spool struct {
	chunks chan []byte
	stop   chan struct{} // closed when the reader gives up
	once   sync.Once
	err    error // the writer's failure, set before chunks is closed
	cur    []byte
}

func newSpool() *spool {
	return &spool{chunks: make(chan []byte, spoolChunks), stop: make(chan struct{})}
}

// Write queues a copy of p, waiting while the spool is full.
func (s *spool) Write(p []byte) (int, error) {
	select {
	case s.chunks <- append([]byte(nil), p...):
		return len(p), nil
	case <-s.stop:
		return 0, io.ErrClosedPipe
	}
}

// closeWrite ends the writes: the reader gets err (io.EOF when nil) once
// it has read everything before it.
func (s *spool) closeWrite(err error) {
	s.err = err
	close(s.chunks)
}

// Read returns what was written, in order.
func (s *spool) Read(p []byte) (int, error) {
	for len(s.cur) == 0 {
		c, ok := <-s.chunks
		if !ok {
			if s.err != nil {
				return 0, s.err
			}
			return 0, io.EOF
		}
		s.cur = c
	}
	n := copy(p, s.cur)
	s.cur = s.cur[n:]
	return n, nil
}

// closeRead tells the writer nothing more will be read.
func (s *spool) closeRead() { s.once.Do(func() { close(s.stop) }) }

// spoolCopy runs a COPY ... TO STDOUT on src into s, then closes s for
// writing with the outcome.
func spoolCopy(ctx context.Context, src *pgconn.PgConn, sql string, s *spool) error {
	bw := bufio.NewWriterSize(s, copyBufferSize)
	_, err := src.CopyTo(ctx, bw, sql)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		err = fmt.Errorf("read from source: %w", err)
	}
	s.closeWrite(err)
	return err
}

// throughSpool runs the COPY sql on src into a spool that use reads from
// at the same time; when both fail, the source's failure is the one that
// counts.
func throughSpool(ctx context.Context, src *pgconn.PgConn, sql string, use func(io.Reader) error) error {
	s := newSpool()
	done := make(chan error, 1)
	go func() { done <- spoolCopy(ctx, src, sql, s) }()
	err := use(s)
	s.closeRead()
	if serr := <-done; sourceFailed(serr) {
		return serr
	}
	return err
}

// reader is a batch in flight whose spools can be closed for reading.
type reader interface{ closeRead() }

// stopProducer stops a producer of batches after the destination failed
// (or the run was stopped): it cancels it, lets it out of the spools of
// current (the batch being applied, if any) and of those it already sent,
// and waits for it. It returns the producer's own failure, if the source
// failed first.
func stopProducer[B reader](cancel func(), batches <-chan B, produced <-chan error, current ...B) error {
	cancel()
	for _, b := range current {
		b.closeRead()
	}
	for b := range batches {
		b.closeRead()
	}
	if err := <-produced; sourceFailed(err) {
		return err
	}
	return nil
}

// sourceFailed tells a producer's own failure from one the destination's
// failure caused (a cancelled context, a spool no longer read).
func sourceFailed(err error) bool {
	return err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, io.ErrClosedPipe)
}
