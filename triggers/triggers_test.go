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
	for _, n := range []string{a.Queue.Table, a.Function.Table, a.Insert, a.Update, a.Delete, a.Truncate} {
		require.LessOrEqual(t, len(n), ident.MaxLen, n)
	}
	require.NotEqual(t, a.Queue, b.Queue, "two destinations, two queues")
	require.NotEqual(t, a.Insert, a.Update)
	require.Equal(t, Schema, a.Queue.Schema)
}

func TestCreateQuotesEverything(t *testing.T) {
	t.Parallel()
	part := ident.Name{Schema: "public", Table: `part'; --`}
	s := Spec{
		Source: ident.Name{Schema: "public", Table: `Weird "Name"; DROP TABLE x`},
		Keys:   []Column{{Name: `id"; --`, Type: "integer"}, {Name: `100%s`, Type: "text"}},
		Logdel: true,
		Tag:    "abcd1234",
	}
	s.Tables = []ident.Name{s.Source, part}
	require.NoError(t, s.Validate())
	sql := strings.Join(s.Create(), ";\n")
	require.Contains(t, sql, `"Weird ""Name""; DROP TABLE x"`)
	require.Contains(t, sql, `"id""; --"`)
	require.NotContains(t, sql, `Weird "Name"; DROP`)
	require.Contains(t, sql, "mimeo_deleted_at")
	require.Contains(t, sql, `"id""; --" bigint`, "the queue key is of the widest integer type")
	require.Contains(t, sql, `"100%%s"`, "a % in a name is no format() placeholder")
	require.Len(t, s.Create(), 2+4*2, "queue, function, four triggers on each of the two tables")
	require.Contains(t, s.QueueKeysOf(part), `FROM ONLY "public"."part'; --"`)
}

func TestQueueTypeWidensWithinAKind(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"integer":                        "bigint",
		"smallint":                       "bigint",
		"character varying(20)":          "character varying",
		"character(3)":                   "bpchar",
		"numeric(10,2)":                  "numeric",
		"timestamp(3) without time zone": "timestamp without time zone",
		"timestamp(0) with time zone":    "timestamp with time zone",
		"character varying(5)[]":         "character varying[]",
		"uuid":                           "uuid",
		"text":                           "text",
		"bit(4)":                         "bit(4)",
	} {
		require.Equal(t, want, QueueType(in), in)
	}
}

func TestValidateRefusesClashes(t *testing.T) {
	t.Parallel()
	s := Spec{Source: ident.Name{Schema: "s", Table: "t"}, Keys: []Column{{Name: ColClaimed, Type: "int"}}}
	require.ErrorContains(t, s.Validate(), "clashes")
	require.ErrorContains(t, Spec{Source: ident.Name{Schema: "s", Table: "t"}}.Validate(), "no key")
}
