package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/jackc/pgx/v5/pgconn"
)

// spoolMemory is how much of a spool stays in memory; the rest of a batch
// goes to a temporary file. The source's COPY never waits for the
// destination, so no source statement (and none of its locks) lasts as
// long as the destination's apply.
const spoolMemory = 16 << 20

// chunks are the spool's memory buffers, reused across batches.
var chunks = sync.Pool{New: func() any { b := make([]byte, 0, copyBufferSize); return &b }}

// spool is a pipe with a buffer: a source COPY written into it runs ahead
// of the destination reading it, the first spoolMemory bytes in memory and
// the rest in an unlinked temporary file, read back in order.
type spool struct {
	mu       sync.Mutex
	ready    *sync.Cond
	mem      []*[]byte // chunks written and not read yet, in order
	memBytes int
	file     *os.File // once memory is full, everything after goes here
	written  int64    // bytes in file
	read     int64    // bytes of file read
	closed   bool     // no more writes
	err      error    // the writer's failure
	stopped  bool     // the reader gave up
	cur      *[]byte  // the chunk being read
	off      int
}

func newSpool() *spool {
	s := &spool{}
	s.ready = sync.NewCond(&s.mu)
	return s
}

// Write keeps a copy of p, in memory while there is room, else in the file.
func (s *spool) Write(p []byte) (int, error) {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return 0, io.ErrClosedPipe
	}
	if s.file == nil && s.memBytes+len(p) <= spoolMemory {
		c := chunks.Get().(*[]byte)
		*c = append((*c)[:0], p...)
		s.mem = append(s.mem, c)
		s.memBytes += len(p)
		s.ready.Signal()
		s.mu.Unlock()
		return len(p), nil
	}
	if s.file == nil {
		f, err := os.CreateTemp("", "mimeo-spool-*")
		if err != nil {
			s.mu.Unlock()
			return 0, fmt.Errorf("spill batch to disk: %w", err)
		}
		_ = os.Remove(f.Name()) // gone once closed
		s.file = f
	}
	f, at := s.file, s.written
	s.mu.Unlock()
	// Only this writer appends; the reader reads below s.written.
	n, err := f.WriteAt(p, at)
	s.mu.Lock()
	s.written += int64(n)
	s.ready.Signal()
	s.mu.Unlock()
	if err != nil {
		return n, fmt.Errorf("spill batch to disk: %w", err)
	}
	return n, nil
}

// closeWrite ends the writes: the reader gets err (io.EOF when nil) once
// it has read everything before it.
func (s *spool) closeWrite(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed, s.err = true, err
	s.ready.Signal()
	s.release()
}

// Read returns what was written, in order, waiting for it.
func (s *spool) Read(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if s.cur != nil {
			n := copy(p, (*s.cur)[s.off:])
			s.off += n
			if s.off == len(*s.cur) {
				chunks.Put(s.cur)
				s.cur, s.off = nil, 0
			}
			return n, nil
		}
		if len(s.mem) > 0 {
			s.cur, s.off = s.mem[0], 0
			s.mem[0] = nil
			s.mem = s.mem[1:]
			s.memBytes -= len(*s.cur)
			continue
		}
		if s.read < s.written && s.file != nil {
			f, at := s.file, s.read
			want := min(int64(len(p)), s.written-at)
			s.mu.Unlock()
			n, err := f.ReadAt(p[:want], at)
			s.mu.Lock()
			s.read += int64(n)
			if err != nil && !errors.Is(err, io.EOF) {
				return n, fmt.Errorf("read spilled batch: %w", err)
			}
			return n, nil
		}
		if s.closed {
			s.release()
			if s.err != nil {
				return 0, s.err
			}
			return 0, io.EOF
		}
		if s.stopped {
			return 0, io.ErrClosedPipe
		}
		s.ready.Wait()
	}
}

// closeRead tells the writer nothing more will be read, and frees what is
// held.
func (s *spool) closeRead() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped = true
	s.ready.Broadcast()
	s.release()
}

// release frees the memory and the file once the reader has everything
// or has given up (call with s.mu held).
func (s *spool) release() {
	drained := s.closed && len(s.mem) == 0 && s.cur == nil && s.read >= s.written
	if !s.stopped && !drained {
		return
	}
	for _, c := range s.mem {
		chunks.Put(c)
	}
	s.mem, s.memBytes = nil, 0
	if s.cur != nil {
		chunks.Put(s.cur)
		s.cur = nil
	}
	if s.file != nil {
		_ = s.file.Close()
		s.file = nil
	}
}

// spoolCopy runs a COPY ... TO STDOUT on src into s, then closes s for
// writing with the outcome.
func spoolCopy(ctx context.Context, src *pgconn.PgConn, sql string, s *spool) error {
	err := copyOut(ctx, src, sql, s)
	s.closeWrite(err)
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
