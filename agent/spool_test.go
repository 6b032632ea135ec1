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

// A batch larger than the spool's memory spills to a file: the writer
// never waits for the reader, and the reader still gets every byte in
// order.
func TestSpoolSpillsWithoutWaiting(t *testing.T) {
	s := newSpool()
	want := make([]byte, spoolMemory+3*copyBufferSize+12345)
	for i := range want {
		want[i] = byte(i * 7)
	}
	for i := 0; i < len(want); i += copyBufferSize {
		if _, err := s.Write(want[i:min(i+copyBufferSize, len(want))]); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	s.closeWrite(nil) // all written before anything was read
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, not the %d written", len(got), len(want))
	}
	if s.file != nil {
		t.Fatal("the spill file is still open after the last read")
	}
}

// A reader that gives up makes the writer fail, and frees what is held.
func TestSpoolReaderGivesUp(t *testing.T) {
	s := newSpool()
	if _, err := s.Write([]byte("x")); err != nil {
		t.Fatalf("write: %v", err)
	}
	s.closeRead()
	if _, err := s.Write([]byte("y")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("write after closeRead: %v, want io.ErrClosedPipe", err)
	}
	if len(s.mem) != 0 {
		t.Fatal("chunks still held after closeRead")
	}
}

// A reader waits for the writer.
func TestSpoolReaderWaits(t *testing.T) {
	s := newSpool()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(s)
		got <- b
	}()
	time.Sleep(20 * time.Millisecond)
	_, _ = s.Write([]byte("late"))
	s.closeWrite(nil)
	select {
	case b := <-got:
		if string(b) != "late" {
			t.Fatalf("read %q", b)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("reader never woke")
	}
}
