package logical

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// rowMessage is a pgoutput INSERT, UPDATE or DELETE, decoded straight
// from the message's bytes into values. pglogrepl.Parse makes two objects
// per column and copies each value byte by byte: while catching up that
// was a fifth of the agent's CPU, which the destination's backend and the
// walsender need on a small machine. Every other message still goes
// through pglogrepl.
type rowMessage struct {
	op        byte // opInsert, opUpdate or opDelete
	relID     uint32
	old       []*string // the old key (or row), when sent
	new       []*string
	unchanged []bool // new values not sent (unchanged TOAST)
	size      int    // bytes held, for the memory budget
}

// isRowMessage says whether a pgoutput message is one decodeRow takes.
func isRowMessage(b []byte) bool {
	return len(b) > 0 && (b[0] == opInsert || b[0] == opUpdate || b[0] == opDelete)
}

// decodeRow decodes an 'I', 'U' or 'D' message of pgoutput's protocol 1,
// or of protocol 2 outside a streamed block. The values are copied: b may
// be reused once it returns.
func decodeRow(b []byte) (*rowMessage, error) { return decodeRowAt(b, false) }

// decodeRowAt decodes a row message; inStream says it came in a streamed
// transaction's block, where a transaction id follows the message type.
func decodeRowAt(b []byte, inStream bool) (*rowMessage, error) {
	head := 5
	if inStream {
		head = 9
	}
	if len(b) < head+1 {
		return nil, fmt.Errorf("pgoutput %q message of %d bytes is too short", b[:min(len(b), 1)], len(b))
	}
	m := &rowMessage{op: b[0], relID: binary.BigEndian.Uint32(b[head-4 : head])}
	p := b[head:]
	var err error
	tuple := func() (vals []*string, unchanged []bool, n int) {
		var size int
		vals, unchanged, size, n, err = decodeTuple(p[1:])
		m.size += size
		return vals, unchanged, n + 1
	}
	if m.op != opInsert && (p[0] == 'K' || p[0] == 'O') {
		var n int
		m.old, _, n = tuple()
		if err != nil {
			return nil, fmt.Errorf("pgoutput %q message, old tuple: %w", m.op, err)
		}
		p = p[n:]
	}
	switch {
	case m.op == opDelete:
		if m.old == nil {
			return nil, fmt.Errorf("pgoutput 'D' message without its old key")
		}
		p = nil
	case len(p) == 0 || p[0] != 'N':
		return nil, fmt.Errorf("pgoutput %q message without its new tuple", m.op)
	default:
		var n int
		m.new, m.unchanged, n = tuple()
		if err != nil {
			return nil, fmt.Errorf("pgoutput %q message, new tuple: %w", m.op, err)
		}
		p = p[n:]
	}
	if len(p) > 0 {
		return nil, fmt.Errorf("pgoutput %q message has %d bytes after its tuples", m.op, len(p))
	}
	return m, nil
}

// decodeTuple decodes pgoutput TupleData: its values (nil for NULL and
// for an unchanged TOASTed value, marked in unchanged), the bytes they
// hold and the bytes read. The values share one string.
func decodeTuple(b []byte) (vals []*string, unchanged []bool, size, read int, err error) {
	if len(b) < 2 {
		return nil, nil, 0, 0, fmt.Errorf("tuple of %d bytes", len(b))
	}
	cols := int(binary.BigEndian.Uint16(b))
	// First pass: check the lengths and add them up.
	at, total := 2, 0
	for i := range cols {
		if at >= len(b) {
			return nil, nil, 0, 0, fmt.Errorf("column %d of %d is missing", i+1, cols)
		}
		switch kind := b[at]; kind {
		case 'n', 'u':
			at++
		case 't', 'b':
			if at+5 > len(b) {
				return nil, nil, 0, 0, fmt.Errorf("column %d of %d has no length", i+1, cols)
			}
			l := int(binary.BigEndian.Uint32(b[at+1:]))
			at += 5
			if l < 0 || l > len(b)-at {
				return nil, nil, 0, 0, fmt.Errorf("column %d of %d is %d bytes long, %d are left", i+1, cols, l, len(b)-at)
			}
			at += l
			total += l
		default:
			return nil, nil, 0, 0, fmt.Errorf("column %d of %d is of unknown kind %q", i+1, cols, kind)
		}
	}
	read = at
	var sb strings.Builder
	sb.Grow(total)
	for at = 2; at < read; {
		if k := b[at]; k == 'n' || k == 'u' {
			at++
			continue
		}
		l := int(binary.BigEndian.Uint32(b[at+1:]))
		sb.Write(b[at+5 : at+5+l])
		at += 5 + l
	}
	all := sb.String()
	vals = make([]*string, cols)
	strs := make([]string, cols)
	pos := 0
	at = 2
	for i := range cols {
		switch b[at] {
		case 'n':
			at++
		case 'u':
			if unchanged == nil {
				unchanged = make([]bool, cols)
			}
			unchanged[i] = true
			at++
		default:
			l := int(binary.BigEndian.Uint32(b[at+1:]))
			strs[i] = all[pos : pos+l]
			vals[i] = &strs[i]
			pos += l
			at += 5 + l
		}
	}
	return vals, unchanged, total + 16*cols, read, nil
}
