package logical

import (
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

func str(s string) *string { return &s }

// testPlan is a table (id key, v, big) taken from a relation of the same.
func testPlan(logdel bool) *plan {
	rel := &relation{schema: "public", table: "t", columns: []relColumn{{name: "id", key: true}, {name: "v"}, {name: "big"}}}
	cfg := &tableConfig{dest: ident.Name{Schema: "public", Table: "t"}, destText: "public.t", logdel: logdel, keys: []string{"id"}}
	p := &plan{cfg: cfg, rel: rel, relTypes: []string{"integer", "text", "text"}}
	for i, c := range rel.columns {
		p.cols = append(p.cols, planCol{name: c.name, typ: p.relTypes[i], src: i})
	}
	p.keys = p.cols[:1]
	return p
}

func tuple(vals ...*string) []*string { return vals }

// keyOf is how the batch's segments name the row of key id.
func keyOf(b *tableBatch, id string) string {
	_, k := b.plan.keyOf(tuple(&id))
	return k
}

var toastOnly = []bool{false, false, true} // big not sent

func TestBatchFoldsChangesPerKey(t *testing.T) {
	b := newTableBatch(testPlan(false), 0)
	b.add(change{op: opInsert, new: tuple(str("1"), str("a"), str("BIG"))}, "t1")
	b.add(change{op: opUpdate, new: tuple(str("1"), str("b"), nil), unchanged: toastOnly}, "t2")
	b.add(change{op: opUpdate, new: tuple(str("2"), str("x"), nil), unchanged: toastOnly}, "t2")
	b.add(change{op: opUpdate, new: tuple(str("2"), nil, str("NEW")), unchanged: []bool{false, true, false}}, "t3")
	b.add(change{op: opDelete, old: tuple(str("3"), nil, nil)}, "t3")
	require.Len(t, b.segs, 1)
	s := b.segs[0]
	one := s.ops[keyOf(b, "1")]
	require.Equal(t, rowFull, one.kind, "an update of a row inserted in the batch is the whole row")
	require.Equal(t, "BIG", *one.tuple[2], "its unchanged value comes from the insert")
	require.Equal(t, "b", *one.tuple[1])
	two := s.ops[keyOf(b, "2")]
	require.Equal(t, rowPartial, two.kind)
	require.Equal(t, "x", *two.tuple[1])
	require.Equal(t, "NEW", *two.tuple[2])
	require.Equal(t, []bool{false, false, false}, two.unchanged, "each column was sent by one of the updates")
	require.Equal(t, rowRemove, s.ops[keyOf(b, "3")].kind)
}

func TestBatchKeyChangeWithUnchangedToastMovesAlone(t *testing.T) {
	b := newTableBatch(testPlan(false), 0)
	b.add(change{op: opInsert, new: tuple(str("9"), str("a"), str("b"))}, "t1")
	b.add(change{op: opUpdate, old: tuple(str("1"), nil, nil), new: tuple(str("2"), str("v"), nil), unchanged: toastOnly}, "t2")
	b.add(change{op: opInsert, new: tuple(str("1"), str("again"), str("c"))}, "t3")
	require.Len(t, b.segs, 3)
	require.Len(t, b.segs[0].ops, 1)
	require.NotNil(t, b.segs[1].move)
	require.Equal(t, "1", *b.segs[1].moveFrom[0])
	require.Equal(t, "2", *b.segs[1].move.key[0])
	require.Equal(t, rowFull, b.segs[2].ops[keyOf(b, "1")].kind, "the old key's new row comes after the move")
}

func TestBatchKeyChangeOfAFullRow(t *testing.T) {
	b := newTableBatch(testPlan(false), 0)
	b.add(change{op: opInsert, new: tuple(str("1"), str("a"), str("BIG"))}, "t1")
	b.add(change{op: opUpdate, old: tuple(str("1"), nil, nil), new: tuple(str("2"), str("a"), nil), unchanged: toastOnly}, "t2")
	require.Len(t, b.segs, 1)
	s := b.segs[0]
	require.Equal(t, rowRemove, s.ops[keyOf(b, "1")].kind)
	require.Equal(t, rowFull, s.ops[keyOf(b, "2")].kind)
	require.Equal(t, "BIG", *s.ops[keyOf(b, "2")].tuple[2])
}

func TestBatchLogdelAndTruncate(t *testing.T) {
	b := newTableBatch(testPlan(true), 0)
	b.add(change{op: opInsert, new: tuple(str("1"), str("a"), nil)}, "t1")
	b.add(change{op: opDelete, old: tuple(str("1"), nil, nil)}, "t2")
	b.add(change{op: opDelete, old: tuple(str("2"), nil, nil)}, "t3")
	b.add(change{op: opTruncate}, "t4")
	b.add(change{op: opInsert, new: tuple(str("1"), str("back"), nil)}, "t5")
	require.Len(t, b.segs, 2)
	one := b.segs[0].ops[keyOf(b, "1")]
	require.Equal(t, rowFull, one.kind, "inserted and deleted in the batch: kept with its values")
	require.Equal(t, "t2", *one.deletedAt)
	require.Equal(t, rowMark, b.segs[0].ops[keyOf(b, "2")].kind)
	require.True(t, b.segs[1].truncate)
	require.Equal(t, "t4", b.segs[1].truncateAt)
	require.Equal(t, rowFull, b.segs[1].ops[keyOf(b, "1")].kind)
}

// BenchmarkBatchFold folds a piece of 7,000 updates of distinct keys, as a
// large transaction's pieces hold.
func BenchmarkBatchFold(b *testing.B) {
	p := testPlan(false)
	changes := make([]change, 7000)
	for i := range changes {
		id := strconv.Itoa(i)
		changes[i] = change{op: opUpdate, new: tuple(&id, str("v"), str("big"))}
	}
	b.ReportAllocs()
	for b.Loop() {
		tb := newTableBatch(p, len(changes))
		for _, c := range changes {
			tb.add(c, "t")
		}
	}
}
