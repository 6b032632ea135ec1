package triggers

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

func TestNamesFitAndDiffer(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("x", 63)
	a := Spec{Source: ident.Name{Schema: long, Table: long}, Tag: Tag("dest-1", "public.t")}.Names()
	b := Spec{Source: ident.Name{Schema: long, Table: long}, Tag: Tag("dest-2", "public.t")}.Names()
	for _, n := range []string{a.Queue.Table, a.Function.Table, a.Insert, a.Update, a.Delete} {
		require.LessOrEqual(t, len(n), ident.MaxLen, n)
	}
	require.NotEqual(t, a.Queue, b.Queue, "two destinations, two queues")
	require.NotEqual(t, a.Insert, a.Update)
	require.Equal(t, Schema, a.Queue.Schema)
}

func TestCreateQuotesEverything(t *testing.T) {
	t.Parallel()
	s := Spec{
		Source:  ident.Name{Schema: "public", Table: `Weird "Name"; DROP TABLE x`},
		Keys:    []Column{{Name: `id"; --`, Type: "integer"}},
		Columns: []Column{{Name: `id"; --`, Type: "integer"}, {Name: "v", Type: "text"}},
		Logdel:  true,
		Tag:     "abcd1234",
	}
	require.NoError(t, s.Validate())
	sql := strings.Join(s.Create(), ";\n")
	require.Contains(t, sql, `"Weird ""Name""; DROP TABLE x"`)
	require.Contains(t, sql, `"id""; --"`)
	require.NotContains(t, sql, `Weird "Name"; DROP`)
	require.Contains(t, sql, "mimeo_deleted_at")
	require.Len(t, s.Create(), 6, "queue, function, four triggers")
}

func TestValidateRefusesClashes(t *testing.T) {
	t.Parallel()
	s := Spec{Source: ident.Name{Schema: "s", Table: "t"}, Keys: []Column{{Name: ColClaimed, Type: "int"}}}
	require.ErrorContains(t, s.Validate(), "clashes")
	require.ErrorContains(t, Spec{Source: ident.Name{Schema: "s", Table: "t"}}.Validate(), "no key")
}
