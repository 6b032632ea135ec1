package logical

import (
	"encoding/binary"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"
)

// col is one column of a tuple to encode: kind 't', 'b', 'n' or 'u'.
type col struct {
	kind byte
	data string
}

// tupleBytes encodes a pgoutput TupleData.
func tupleBytes(cols ...col) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(cols)))
	for _, c := range cols {
		b = append(b, c.kind)
		if c.kind == 't' || c.kind == 'b' {
			b = binary.BigEndian.AppendUint32(b, uint32(len(c.data)))
			b = append(b, c.data...)
		}
	}
	return b
}

// rowBytes encodes a row message: op, relation 7, then each (marker, tuple).
func rowBytes(op byte, parts ...any) []byte {
	b := binary.BigEndian.AppendUint32([]byte{op}, 7)
	for _, p := range parts {
		switch p := p.(type) {
		case byte:
			b = append(b, p)
		case []byte:
			b = append(b, p...)
		}
	}
	return b
}

// reference decodes m with pglogrepl, as the values decodeRow must give.
func reference(t *testing.T, b []byte) *rowMessage {
	t.Helper()
	msg, err := pglogrepl.Parse(b)
	require.NoError(t, err)
	conv := func(td *pglogrepl.TupleData) ([]*string, []bool) {
		if td == nil {
			return nil, nil
		}
		vals := make([]*string, len(td.Columns))
		var unchanged []bool
		for i, c := range td.Columns {
			switch c.DataType {
			case pglogrepl.TupleDataTypeText, pglogrepl.TupleDataTypeBinary:
				s := string(c.Data)
				vals[i] = &s
			case pglogrepl.TupleDataTypeToast:
				if unchanged == nil {
					unchanged = make([]bool, len(td.Columns))
				}
				unchanged[i] = true
			}
		}
		return vals, unchanged
	}
	r := &rowMessage{}
	switch m := msg.(type) {
	case *pglogrepl.InsertMessage:
		r.op, r.relID = opInsert, m.RelationID
		r.new, r.unchanged = conv(m.Tuple)
	case *pglogrepl.UpdateMessage:
		r.op, r.relID = opUpdate, m.RelationID
		r.old, _ = conv(m.OldTuple)
		r.new, r.unchanged = conv(m.NewTuple)
	case *pglogrepl.DeleteMessage:
		r.op, r.relID = opDelete, m.RelationID
		r.old, _ = conv(m.OldTuple)
	}
	return r
}

func TestDecodeRowMatchesPglogrepl(t *testing.T) {
	full := tupleBytes(col{'t', "42"}, col{'n', ""}, col{'t', ""}, col{'t', "tab\there, \\ and ünïcode"}, col{'b', "\x00\x01"})
	toast := tupleBytes(col{'t', "42"}, col{'u', ""}, col{'t', "x"}, col{'u', ""}, col{'n', ""})
	key := tupleBytes(col{'t', "41"}, col{'n', ""}, col{'n', ""}, col{'n', ""}, col{'n', ""})
	cases := map[string][]byte{
		"insert":               rowBytes('I', byte('N'), full),
		"update":               rowBytes('U', byte('N'), full),
		"update, unchanged":    rowBytes('U', byte('N'), toast),
		"update of the key":    rowBytes('U', byte('K'), key, byte('N'), toast),
		"update, full old row": rowBytes('U', byte('O'), full, byte('N'), full),
		"delete":               rowBytes('D', byte('K'), key),
		"delete, full old row": rowBytes('D', byte('O'), full),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			got, err := decodeRow(b)
			require.NoError(t, err)
			want := reference(t, b)
			require.Equal(t, want.op, got.op)
			require.Equal(t, uint32(7), got.relID)
			require.Equal(t, want.old, got.old)
			require.Equal(t, want.new, got.new)
			require.Equal(t, want.unchanged, got.unchanged)
			require.Positive(t, got.size)
		})
	}
}

// In a streamed transaction's block (protocol 2) a transaction id follows
// the message type; the rest decodes as outside one.
func TestDecodeRowInAStreamedBlock(t *testing.T) {
	plain := rowBytes('U', byte('K'), tupleBytes(col{'t', "1"}), byte('N'), tupleBytes(col{'t', "2"}, col{'u', ""}))
	streamed := append(binary.BigEndian.AppendUint32([]byte{plain[0]}, 991), plain[1:]...)
	got, err := decodeRowAt(streamed, true)
	require.NoError(t, err)
	want, err := decodeRow(plain)
	require.NoError(t, err)
	require.Equal(t, want, got)
	v2, err := pglogrepl.ParseV2(streamed, true)
	require.NoError(t, err)
	u, ok := v2.(*pglogrepl.UpdateMessageV2)
	require.True(t, ok)
	require.Equal(t, uint32(991), u.Xid)
	require.Equal(t, u.RelationID, got.relID)
	for n := range len(streamed) {
		_, err := decodeRowAt(streamed[:n], true)
		require.Error(t, err, "cut to %d of %d bytes", n, len(streamed))
	}
}

func TestDecodeRowValuesOutliveTheBuffer(t *testing.T) {
	b := rowBytes('I', byte('N'), tupleBytes(col{'t', "kept"}))
	m, err := decodeRow(b)
	require.NoError(t, err)
	for i := range b {
		b[i] = 'z'
	}
	require.Equal(t, "kept", *m.new[0])
}

func TestDecodeRowRefusesBrokenMessages(t *testing.T) {
	good := rowBytes('U', byte('K'), tupleBytes(col{'t', "1"}), byte('N'), tupleBytes(col{'t', "2"}, col{'u', ""}))
	// Every cut short message is refused (never a panic or a short row).
	for n := range len(good) {
		_, err := decodeRow(good[:n])
		require.Error(t, err, "cut to %d of %d bytes", n, len(good))
	}
	for name, b := range map[string][]byte{
		"trailing bytes":       append(append([]byte{}, good...), 0),
		"unknown column kind":  rowBytes('I', byte('N'), tupleBytes(col{'x', ""})),
		"insert without N":     rowBytes('I', byte('K'), tupleBytes(col{'t', "1"})),
		"delete without a key": rowBytes('D', byte('N'), tupleBytes(col{'t', "1"})),
		"length past the end":  rowBytes('I', byte('N'), []byte{0, 1, 't', 0x7f, 0xff, 0xff, 0xff, 'a'}),
	} {
		_, err := decodeRow(b)
		require.Error(t, err, name)
	}
}

// BenchmarkDecodeRow decodes the bench's UPDATE of a row of five columns.
func BenchmarkDecodeRow(b *testing.B) {
	msg := rowBytes('U', byte('N'), tupleBytes(col{'t', "523411"}, col{'t', "1284731236"},
		col{'t', "5b6ba13f1b4bcb3a9c9bfb11c5c5a8d2-0523411"}, col{'t', "41324.1231"}, col{'t', "2024-06-11 10:21:33.123456+00"}))
	b.Run("decodeRow", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := decodeRow(msg); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("pglogrepl", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := pglogrepl.Parse(msg); err != nil {
				b.Fatal(err)
			}
		}
	})
}
