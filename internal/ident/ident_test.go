package ident

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParse(t *testing.T) {
	t.Parallel()
	cases := map[string]Name{
		"public.items":                      {"public", "items"},
		"Public.Items":                      {"public", "items"},
		`public."Weird Name; DROP TABLE x"`: {"public", "Weird Name; DROP TABLE x"},
		`"My ""Schema"""."a.b"`:             {`My "Schema"`, "a.b"},
		` s . t `:                           {"s", "t"},
	}
	for in, want := range cases {
		got, err := Parse(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"items", "a.b.c", `"unterminated.x`, `"".x`, "a.", ".b", "a b.c"} {
		_, err := Parse(bad)
		require.Error(t, err, bad)
	}
}

func TestSanitizeRoundTrip(t *testing.T) {
	t.Parallel()
	n := Name{"public", `Weird "Name"; DROP TABLE x`}
	got, err := Parse(n.Sanitize())
	require.NoError(t, err)
	require.Equal(t, n, got)
}

func TestDerive(t *testing.T) {
	t.Parallel()
	require.Equal(t, "items_snap1", Derive("items", "_snap1"))

	long := strings.Repeat("é", 40) // 80 bytes
	a := Derive(long, "_snap1")
	b := Derive(long+"x", "_snap1")
	require.LessOrEqual(t, len(a), MaxLen)
	require.True(t, strings.HasSuffix(a, "_snap1"))
	require.NotEqual(t, a, b, "different inputs must stay different")
	require.Equal(t, a, Derive(long, "_snap1"), "deterministic")
	require.True(t, strings.ToValidUTF8(a, "?") == a, "valid UTF-8")
	require.LessOrEqual(t, len(Derive("x", strings.Repeat("s", 70))), MaxLen)
}
