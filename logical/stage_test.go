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
