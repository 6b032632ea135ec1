package logical

import (
	"strings"
)

// Row operations a batch reduces a table's changes to: one per key and
// segment, applied set-based.
const (
	rowFull    = iota // delete whatever the key has, insert this row
	rowRemove         // delete the key's live row (an old key, a dml delete)
	rowMark           // logdel: mark the key's live row deleted
	rowPartial        // update the columns sent; others (unchanged TOAST) stay
)

// rowOp is the net effect of a segment's changes on one key.
type rowOp struct {
	kind      int
	key       []*string // the key's values, in plan.keys order
	tuple     []*string // full, partial: the row in relation order
	unchanged []bool    // partial: columns left as the destination has them
	deletedAt *string   // logdel: a full row deleted within the batch, or a mark
}

// segment is a run of changes whose net effects per key commute. A
// TRUNCATE starts one; so does a change that cannot be folded into the
// current one (an UPDATE changing the key of a row whose unchanged TOAST
// values only the destination has).
type segment struct {
	truncate   bool
	truncateAt string
	ops        map[string]*rowOp
	order      []string
	move       *rowOp    // a key-changing partial update, alone in its segment
	moveFrom   []*string // its old key
	prep       *prepared // its rows in arrays, once built
}

// tableBatch collects one destination table's changes in a destination
// transaction.
type tableBatch struct {
	plan    *plan
	segs    []*segment
	changes int
	hint    int // the keys a segment is made room for
}

// newTableBatch makes a batch whose segments have room for hint keys
// (a map grown key by key rehashes all it holds, again and again).
func newTableBatch(p *plan, hint int) *tableBatch {
	b := &tableBatch{plan: p, hint: hint}
	b.next()
	return b
}

func (b *tableBatch) cur() *segment { return b.segs[len(b.segs)-1] }

func (b *tableBatch) next() *segment {
	s := &segment{ops: make(map[string]*rowOp, b.hint)}
	b.segs = append(b.segs, s)
	return s
}

// empty reports whether the batch holds nothing to apply.
func (b *tableBatch) empty() bool {
	return b.changes == 0
}

func (s *segment) put(k string, op *rowOp) {
	if _, ok := s.ops[k]; !ok {
		s.order = append(s.order, k)
	}
	s.ops[k] = op
}

// count is the number of the segment's row operations of kind.
func (s *segment) count(kind int) int {
	n := 0
	for _, k := range s.order {
		if s.ops[k].kind == kind {
			n++
		}
	}
	return n
}

// keyOf extracts the key values of a tuple (relation order), and a string
// that tells the plan's keys apart.
func (p *plan) keyOf(t []*string) ([]*string, string) {
	if len(p.keys) == 1 {
		// One column: its value itself (no text value holds a NUL).
		var v *string
		if k := p.keys[0].src; k < len(t) {
			v = t[k]
		}
		if v == nil {
			return []*string{nil}, "\x00"
		}
		return []*string{v}, *v
	}
	vals := make([]*string, len(p.keys))
	var sb strings.Builder
	for i, k := range p.keys {
		if k.src < len(t) {
			vals[i] = t[k.src]
		}
		if vals[i] == nil {
			sb.WriteString("\x01")
		} else {
			sb.WriteString(*vals[i])
		}
		sb.WriteByte(0)
	}
	return vals, sb.String()
}

// overlay fills the unchanged columns of tuple from base.
func overlay(base, tuple []*string, unchanged []bool) []*string {
	out := make([]*string, len(tuple))
	copy(out, tuple)
	for i, u := range unchanged {
		if u && i < len(base) {
			out[i] = base[i]
		}
	}
	return out
}

// anyTrue reports whether any element is set.
func anyTrue(b []bool) bool {
	for _, v := range b {
		if v {
			return true
		}
	}
	return false
}

// add folds one change, committed at commitAt (text timestamptz), into
// the batch.
func (b *tableBatch) add(c change, commitAt string) {
	p := b.plan
	logdel := p.cfg.logdel
	b.changes++
	s := b.cur()
	switch c.op {
	case opTruncate:
		s = b.next()
		s.truncate, s.truncateAt = true, commitAt
	case opInsert:
		key, k := p.keyOf(c.new)
		s.put(k, &rowOp{kind: rowFull, key: key, tuple: c.new})
	case opDelete:
		key, k := p.keyOf(c.old)
		prev := s.ops[k]
		switch {
		case !logdel:
			s.put(k, &rowOp{kind: rowRemove, key: key})
		case prev != nil && prev.kind == rowFull:
			at := commitAt
			prev.deletedAt = &at
		case prev != nil && prev.kind == rowPartial:
			s = b.next()
			fallthrough
		default:
			at := commitAt
			s.put(k, &rowOp{kind: rowMark, key: key, deletedAt: &at})
		}
	case opUpdate:
		newKey, nk := p.keyOf(c.new)
		ok := nk
		var oldKey []*string
		if c.old != nil {
			oldKey, ok = p.keyOf(c.old)
		}
		tuple, unchanged := c.new, c.unchanged
		partial := anyTrue(unchanged)
		if ok != nk {
			prev := s.ops[ok]
			if partial {
				if prev != nil && prev.kind == rowFull && prev.deletedAt == nil {
					tuple, partial = overlay(prev.tuple, tuple, unchanged), false
				} else {
					// Only the destination has the unchanged values: move
					// the row there, in a segment of its own.
					if len(s.ops) > 0 || s.truncate || s.move != nil {
						s = b.next()
					}
					s.move = &rowOp{kind: rowPartial, key: newKey, tuple: tuple, unchanged: unchanged}
					s.moveFrom = oldKey
					b.next()
					return
				}
			}
			s.put(ok, &rowOp{kind: rowRemove, key: oldKey})
			s.put(nk, &rowOp{kind: rowFull, key: newKey, tuple: tuple})
			return
		}
		prev := s.ops[nk]
		switch {
		case !partial:
			s.put(nk, &rowOp{kind: rowFull, key: newKey, tuple: tuple})
		case prev != nil && prev.kind == rowFull && prev.deletedAt == nil:
			s.put(nk, &rowOp{kind: rowFull, key: newKey, tuple: overlay(prev.tuple, tuple, unchanged)})
		case prev != nil && prev.kind == rowPartial:
			both := make([]bool, len(unchanged))
			for i := range both {
				both[i] = unchanged[i] && i < len(prev.unchanged) && prev.unchanged[i]
			}
			s.put(nk, &rowOp{kind: rowPartial, key: newKey, tuple: overlay(prev.tuple, tuple, unchanged), unchanged: both})
		case prev == nil:
			s.put(nk, &rowOp{kind: rowPartial, key: newKey, tuple: tuple, unchanged: unchanged})
		default:
			s = b.next()
			s.put(nk, &rowOp{kind: rowPartial, key: newKey, tuple: tuple, unchanged: unchanged})
		}
	}
}
