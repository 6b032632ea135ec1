package agent

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/validate"
)

// keepsDeleted reports whether the type keeps rows its source deleted:
// inserter and updater copy inserts (and updates), never deletes, so a
// destination row the source no longer has is history, not a fault.
func (t *checkTarget) keepsDeleted() bool { return t.Type == "inserter" || t.Type == "updater" }

// refineKept looks row by row into the chunks that differ of an inserter
// or updater, and keeps as differing only those where a source row is
// missing or different on the destination. Rows only the destination has
// (deleted on the source since they were copied) are counted as kept.
func (c *comparison) refineKept(ctx context.Context, stx, dtx pgx.Tx) error {
	var still []int
	c.kept = 0
	for _, i := range c.differ {
		s, d, err := bothSides(ctx, c, stx, dtx, func(ctx context.Context, q pgx.Tx, side validate.Side) ([]validate.RowHash, error) {
			return validate.Rows(ctx, q, c.spec, side, c.chunks[i], c.pending, c.match)
		})
		if err != nil {
			return err
		}
		missing, kept := c.rowDiff(s, d)
		c.kept += kept
		if missing > 0 {
			still = append(still, i)
		}
	}
	c.differ = still
	return nil
}

// rowDiff counts the source rows the destination lacks (or holds
// otherwise) and the destination rows the source lacks. Rows are matched
// by their unique key (c.match), else (an inserter without one) by content.
func (c *comparison) rowDiff(src, dst []validate.RowHash) (missing, kept int64) {
	if len(c.match) > 0 {
		want := make(map[string]int64, len(src))
		for _, r := range src {
			want[strings.Join(r.Key, "\x00")] = r.Hash
		}
		seen := 0
		for _, r := range dst {
			h, ok := want[strings.Join(r.Key, "\x00")]
			switch {
			case !ok:
				kept++
			case h != r.Hash:
				missing++
				seen++
			default:
				seen++
			}
		}
		return missing + int64(len(src)-seen), kept
	}
	count := make(map[int64]int64, len(src))
	for _, r := range src {
		count[r.Hash]++
	}
	for _, r := range dst {
		count[r.Hash]--
	}
	for _, n := range count {
		if n > 0 {
			missing += n
		} else {
			kept -= n
		}
	}
	return missing, kept
}

// describeKept says what refineKept left alone.
func (c *comparison) describeKept() string {
	if c.kept == 0 {
		return ""
	}
	return fmt.Sprintf("; %d destination rows the source no longer has are kept (an %s copies no deletes)", c.kept, c.t.Type)
}
