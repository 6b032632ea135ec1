package logical

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sys/unix"
)

// The walsender writes each message with a send() of its own, and every
// send to a socket someone waits on wakes the waiter. Go's runtime waits
// on all its sockets at once (epoll), so a reader that keeps up is woken
// once per message of ~150 bytes: on a busy machine a third of the
// agent's CPU went on those wake-ups.
//
// quietConn (Linux) takes the replication socket out of Go's poller.
// After a read that found data, it sleeps a moment without waiting on the
// socket (the walsender's sends then only queue), then takes what came
// meanwhile in one read. When a read finds nothing, it waits on the socket
// (poll), so an idle stream costs little and a lone change is read at
// once. One goroutine reads at a time (pgconn's); writes, deadlines and
// Close may come from others.
type quietConn struct {
	local, remote net.Addr
	buf           []byte
	r, w          int
	gather        bool      // the last read found data: let more come before the next
	filled        time.Time // when

	mu      sync.Mutex
	fd      int
	users   int // reads and writes under way: the descriptor stays open
	closed  bool
	readBy  time.Time
	writeBy time.Time
}

const (
	quietBuf = 256 << 10 // bytes taken from the socket at most at once
	// quietGather is the sleep after a read that found data: long enough
	// for many messages to queue, short against the latency targets, and
	// well below the time a walsender needs to fill a socket's buffer.
	quietGather = 200 * time.Microsecond
	// quietSlice bounds each wait, so that a deadline moved by another
	// goroutine (pgconn cancels through deadlines) is seen soon; as the
	// receiver's own read deadline, an idle stream wakes 10 times a second.
	quietSlice = 100 * time.Millisecond
)

// quiet makes cfg's connections quietConns: the address is dialled as
// before, and TLS, if any, runs on top. A connection that is not a
// socket stays as it is.
func quiet(cfg *pgconn.Config) {
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		sc, ok := c.(syscall.Conn)
		if !ok {
			return c, nil
		}
		q, err := newQuietConn(c, sc)
		if err != nil {
			_ = c.Close()
			return nil, fmt.Errorf("take the replication socket from Go's poller: %w", err)
		}
		return q, nil
	}
}

// newQuietConn moves c's socket to a quietConn: a duplicate of its
// descriptor, then c closed (which takes it out of Go's poller).
func newQuietConn(c net.Conn, sc syscall.Conn) (*quietConn, error) {
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd, derr := -1, error(nil)
	if err := raw.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	q := &quietConn{fd: fd, local: c.LocalAddr(), remote: c.RemoteAddr(), buf: make([]byte, quietBuf)}
	if err := c.Close(); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	return q, nil
}

// use returns the descriptor for an operation; done must follow. The
// descriptor is closed only once no operation uses it, so that its number
// cannot be reused under a read.
func (q *quietConn) use() (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return -1, net.ErrClosed
	}
	q.users++
	return q.fd, nil
}

func (q *quietConn) done() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.users--
	if q.closed && q.users == 0 && q.fd >= 0 {
		_ = unix.Close(q.fd)
		q.fd = -1
	}
}

// deadline is the current deadline of reads or writes.
func (q *quietConn) deadline(write bool) (time.Time, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if write {
		return q.writeBy, q.closed
	}
	return q.readBy, q.closed
}

// wait polls fd until it can be read (or written) or the deadline of
// reads (or writes) passes, in slices so that a moved deadline or a close
// is seen.
func (q *quietConn) wait(fd int, write bool) error {
	events := int16(unix.POLLIN)
	if write {
		events = unix.POLLOUT
	}
	for {
		by, closed := q.deadline(write)
		if closed {
			return net.ErrClosed
		}
		slice := quietSlice
		if !by.IsZero() {
			left := time.Until(by)
			if left <= 0 {
				return os.ErrDeadlineExceeded
			}
			slice = min(slice, left)
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: events}}
		n, err := unix.Poll(fds, int(max(slice.Milliseconds(), 1)))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return q.opError("poll", err)
		}
		if n > 0 {
			return nil
		}
	}
}

// Read serves what the last socket read took, else reads the socket.
func (q *quietConn) Read(p []byte) (int, error) {
	if q.r == q.w {
		if err := q.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, q.buf[q.r:q.w])
	q.r += n
	return n, nil
}

// fill reads what the socket holds into buf, waiting for it if need be.
func (q *quietConn) fill() error {
	fd, err := q.use()
	if err != nil {
		return err
	}
	defer q.done()
	if q.gather {
		// What is left of the moment since the last read (none when the
		// caller took that long itself).
		q.gather = false
		if left := quietGather - time.Since(q.filled); left > 0 {
			ts := unix.NsecToTimespec(int64(left))
			_ = unix.Nanosleep(&ts, nil) // a syscall: time.Sleep rounds up to a millisecond
		}
	}
	for {
		if by, _ := q.deadline(false); !by.IsZero() && !time.Now().Before(by) {
			return os.ErrDeadlineExceeded
		}
		n, err := unix.Read(fd, q.buf)
		switch {
		case n > 0:
			q.r, q.w, q.gather, q.filled = 0, n, true, time.Now()
			return nil
		case err == nil:
			return io.EOF
		case errors.Is(err, unix.EAGAIN):
			if err := q.wait(fd, false); err != nil {
				return err
			}
		case errors.Is(err, unix.EINTR):
		default:
			return q.opError("read", err)
		}
	}
}

// Write writes all of p.
func (q *quietConn) Write(p []byte) (int, error) {
	fd, err := q.use()
	if err != nil {
		return 0, err
	}
	defer q.done()
	written := 0
	for written < len(p) {
		n, err := unix.Write(fd, p[written:])
		if n > 0 {
			written += n
		}
		switch {
		case err == nil:
		case errors.Is(err, unix.EAGAIN):
			if err := q.wait(fd, true); err != nil {
				return written, err
			}
		case errors.Is(err, unix.EINTR):
		default:
			return written, q.opError("write", err)
		}
	}
	return written, nil
}

func (q *quietConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: q.remote.Network(), Source: q.local, Addr: q.remote, Err: os.NewSyscallError(op, err)}
}

// Close shuts the socket down at once (waking a wait) and closes its
// descriptor once no read or write uses it.
func (q *quietConn) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	q.closed = true
	_ = unix.Shutdown(q.fd, unix.SHUT_RDWR)
	if q.users == 0 {
		err := unix.Close(q.fd)
		q.fd = -1
		return err
	}
	return nil
}

// LocalAddr is the socket's local address.
func (q *quietConn) LocalAddr() net.Addr { return q.local }

// RemoteAddr is the socket's peer address.
func (q *quietConn) RemoteAddr() net.Addr { return q.remote }

// SetDeadline sets both deadlines.
func (q *quietConn) SetDeadline(t time.Time) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.readBy, q.writeBy = t, t
	return nil
}

// SetReadDeadline sets the deadline of reads.
func (q *quietConn) SetReadDeadline(t time.Time) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.readBy = t
	return nil
}

// SetWriteDeadline sets the deadline of writes.
func (q *quietConn) SetWriteDeadline(t time.Time) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.writeBy = t
	return nil
}
