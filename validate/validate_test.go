package validate

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// Key values reach SQL as quoted literals or parameters, never as SQL.
func TestRangeConditionQuotes(t *testing.T) {
	spec := Spec{Key: []Column{{Name: `Odd "Key"`, Type: "text"}, {Name: "n", Type: "integer"}}}
	c := Chunk{Lower: []string{`a'); DROP TABLE x; --`, "1"}, Upper: []string{"b", "2"}}
	got := RangeCondition(spec, c, "d")
	require.Equal(t, `("d"."Odd ""Key""", "d"."n") >= ('a''); DROP TABLE x; --'::text, '1'::integer) AND `+
		`("d"."Odd ""Key""", "d"."n") < ('b'::text, '2'::integer)`, got)
	require.Equal(t, "true", RangeCondition(spec, Chunk{}, ""))
}

// Every chunk gets its own part or a row of the lateral join, and the key
// values travel as parameters.
func TestSumsSQLShape(t *testing.T) {
	spec := Spec{Columns: []Column{{Name: "id", Type: "bigint"}, {Name: "v", Type: "text"}}, Key: []Column{{Name: "id", Type: "bigint"}}}
	chunks := []Chunk{{Upper: []string{"10"}}, {Lower: []string{"10"}, Upper: []string{"20"}}, {Lower: []string{"20"}}}
	sql, args := sumsSQL(spec, Side{Table: ident.Name{Schema: "public", Table: "t; x"}}, chunks, [][]string{{"5"}})
	require.Equal(t, 3, strings.Count(sql, "SELECT 0,")+strings.Count(sql, "SELECT 2,")+strings.Count(sql, "SELECT b.i"))
	require.Contains(t, sql, `FROM "public"."t; x"`)
	require.NotContains(t, sql, "'10'")
	require.Len(t, args, 6) // exclusion keys, first upper, last lower, middle index, lower and upper arrays
}
