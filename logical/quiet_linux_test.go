package logical

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// quietPair is a quietConn and the plain socket at its other end.
func quietPair(t *testing.T) (*quietConn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		_ = f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	q, err := newQuietConn(conns[0], conns[0].(syscall.Conn))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = q.Close(); _ = conns[1].Close() })
	return q, conns[1]
}

func TestQuietConnCarriesBothWays(t *testing.T) {
	q, peer := quietPair(t)
	// More than a socket buffer each way, so that both sides wait.
	out := bytes.Repeat([]byte("walsender "), 200_000)
	go func() { _, _ = peer.Write(out); _ = peer.(*net.UnixConn).CloseWrite() }()
	got, err := io.ReadAll(q)
	if err != nil || !bytes.Equal(got, out) {
		t.Fatalf("read %d of %d bytes, err %v", len(got), len(out), err)
	}
	in := bytes.Repeat([]byte("status "), 300_000)
	done := make(chan []byte)
	go func() { b, _ := io.ReadAll(peer); done <- b }()
	if n, err := q.Write(in); err != nil || n != len(in) {
		t.Fatalf("wrote %d of %d bytes: %v", n, len(in), err)
	}
	_ = q.Close()
	if b := <-done; !bytes.Equal(b, in) {
		t.Fatalf("the peer got %d of %d bytes", len(b), len(in))
	}
}

func TestQuietConnDeadlines(t *testing.T) {
	q, peer := quietPair(t)
	// A deadline passes: a timeout, which pgconn does not treat as fatal.
	_ = q.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	start := time.Now()
	_, err := q.Read(make([]byte, 10))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past its deadline: %v, want a timeout", err)
	}
	if d := time.Since(start); d < 25*time.Millisecond || d > time.Second {
		t.Fatalf("the deadline ended the read after %v", d)
	}
	// The connection still works after a timeout.
	_ = q.SetReadDeadline(time.Time{})
	_, _ = peer.Write([]byte("x"))
	if n, err := q.Read(make([]byte, 10)); n != 1 || err != nil {
		t.Fatalf("read after a timeout: %d, %v", n, err)
	}
	// A deadline moved by another goroutine ends a waiting read soon.
	go func() {
		time.Sleep(50 * time.Millisecond)
		_ = q.SetDeadline(time.Now())
	}()
	start = time.Now()
	if _, err := q.Read(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read ended by a moved deadline: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the moved deadline ended the read after %v", d)
	}
}

func TestQuietConnCloseEndsAWaitingRead(t *testing.T) {
	q, _ := quietPair(t)
	errc := make(chan error, 1)
	go func() {
		_, err := q.Read(make([]byte, 10))
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("a read on a closed connection succeeded")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not end the waiting read")
	}
	q.mu.Lock()
	fd, users := q.fd, q.users
	q.mu.Unlock()
	if fd != -1 || users != 0 {
		t.Fatalf("after Close and the read's end: fd %d, users %d", fd, users)
	}
	if _, err := q.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after Close: %v", err)
	}
}
