package logical

import (
	"bytes"
	"testing"
)

func TestCopyTextEscapesWhatCopyReads(t *testing.T) {
	str := func(s string) *string { return &s }
	for _, c := range []struct {
		in   *string
		want string
	}{
		{nil, `\N`},
		{str(""), ``},
		{str(`\N`), `\\N`},
		{str("a\tb\nc\rd\\e"), `a\tb\nc\rd\\e`},
		{str("plain é"), "plain é"},
	} {
		var b bytes.Buffer
		copyText(&b, c.in)
		if b.String() != c.want {
			t.Errorf("copyText(%q) = %q, want %q", deref(c.in), b.String(), c.want)
		}
	}
}

func deref(s *string) string {
	if s == nil {
		return "<nil>"
	}
	return *s
}

func TestEncodeAheadOnlyWhatIsStaged(t *testing.T) {
	str := func(s string) *string { return &s }
	fill := func(n int) *arrays {
		a := newArrays(2, n)
		for i := range n {
			a.cols[0] = append(a.cols[0], str("k\t"+string(rune('a'+i%26))))
			a.cols[1] = append(a.cols[1], nil)
		}
		return a
	}
	small := fill(stageMin - 1)
	small.encodeAhead()
	if small.text != nil {
		t.Errorf("%d rows, sent as arrays, were encoded", small.len())
	}
	big := fill(stageMin)
	big.encodeAhead()
	var want bytes.Buffer
	big.writeText(&want)
	if !bytes.Equal(big.text, want.Bytes()) || !bytes.HasPrefix(big.text, []byte("k\\ta\t\\N\nk\\tb\t\\N\n")) {
		t.Errorf("encoded ahead: %q...", big.text[:min(40, len(big.text))])
	}
	var none *arrays
	none.encodeAhead() // a segment without such rows
}
