package agent

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"
)

// A spool hands the reader everything written, in order, then the
// writer's outcome.
func TestSpoolPassesBytesInOrder(t *testing.T) {
	s := newSpool()
	want := bytes.Repeat([]byte("0123456789"), 100000)
	go func() {
		for i := 0; i < len(want); i += 7777 {
			_, _ = s.Write(want[i:min(i+7777, len(want))])
		}
		s.closeWrite(nil)
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, not the %d written", len(got), len(want))
	}
}

// The reader sees the writer's failure after the bytes before it.
func TestSpoolReportsWriterFailure(t *testing.T) {
	s := newSpool()
	boom := errors.New("source went away")
	_, _ = s.Write([]byte("abc"))
	s.closeWrite(boom)
	got, err := io.ReadAll(s)
	if string(got) != "abc" || !errors.Is(err, boom) {
		t.Fatalf("read %q, %v; want \"abc\", %v", got, err, boom)
	}
}

// A full spool holds the writer back; a reader that gives up lets it go.
func TestSpoolIsBounded(t *testing.T) {
	s := newSpool()
	for range spoolChunks {
		if _, err := s.Write([]byte("x")); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	blocked := make(chan error, 1)
	go func() {
		_, err := s.Write([]byte("x"))
		blocked <- err
	}()
	select {
	case err := <-blocked:
		t.Fatalf("write to a full spool returned at once (%v)", err)
	case <-time.After(50 * time.Millisecond):
	}
	s.closeRead()
	select {
	case err := <-blocked:
		if !errors.Is(err, io.ErrClosedPipe) {
			t.Fatalf("write after closeRead: %v, want io.ErrClosedPipe", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("writer still blocked after closeRead")
	}
}
