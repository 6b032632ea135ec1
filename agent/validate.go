package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/logical"
	"github.com/mimeo-dev/mimeo/triggers"
	"github.com/mimeo-dev/mimeo/validate"
)

// validateArgs are the arguments of mimeo.validate().
type validateArgs struct {
	Repair bool `json:"repair"`
	// Reason: why the agent queued this check itself (a logical table's
	// partition truncated or rewritten); a difference then fails the table.
	Reason string `json:"reason"`
}

// maxPending bounds the keys of not yet applied changes that a check
// leaves out of its differing chunks; with more, refresh first.
const maxPending = 100000

// logicalRechecks is how often a logical table's differing chunks are
// compared again, each after the stream caught up, before they count.
const logicalRechecks = 3

// comparison is one validate run's view of a table.
type comparison struct {
	t        *checkTarget
	cols     []column // the copied source columns (spec.Columns are these)
	spec     validate.Spec
	src, dst validate.Side
	target   ident.Name // where repairs write: the table (snap: its active table)
	chunks   []validate.Chunk
	pending  [][]string // keys with changes not yet applied, left out
	srcRows  int64
	dstRows  int64
	differ   []int             // chunks that differ, pending changes left out
	kept     int64             // inserter, updater: destination rows the source deleted
	match    []validate.Column // inserter, updater: the unique key rows are matched by (nil: by content)
	repaired int64             // rows re-pulled
	// notCompared: a queued TRUNCATE makes every difference pending.
	notCompared bool
	note        string
}

// validateTable compares a table's content on both sides chunk by chunk
// and, asked to, re-pulls the chunks that differ.
func (a *Agent) validateTable(ctx context.Context, r *run) error {
	var args validateArgs
	if err := r.args(&args); err != nil {
		return err
	}
	fail := func(err error) error { return fmt.Errorf("validate %s: %w", r.dest, err) }
	targets, err := loadCheckTargets(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return fail(err)
	}
	t := targets[0]
	src, st, err := a.openSource(ctx, r, sourceSpec{Dblink: t.Dblink, Table: t.Source.String(),
		Filter: nullIfEmpty(t.Filter), Condition: t.Condition, Indexes: true})
	if err != nil {
		return fail(err)
	}
	defer src.Release()
	d, err := checkColumns(ctx, r.dst, t.Dest, st, t.Columns, t.ownColumns()...)
	if err != nil {
		return fail(err)
	}
	if !d.none() {
		row := checkRow{Dest: r.req.DestTable, Kind: "checksum",
			Detail: fmt.Sprintf("not compared: the source's columns changed (%s); rebuild the table first (repull)", d)}
		return r.completeChecks(ctx, row.message(), row)
	}
	c := &comparison{t: t, cols: st.Columns, src: validate.Side{Table: t.Source, Where: t.sourceWhere()},
		dst: validate.Side{Table: t.Dest, Where: t.destWhere()}, target: t.Dest}
	c.spec = validate.Spec{Columns: validateColumns(st.Columns), Key: t.chunkKey(st), ChunkRows: a.cfg.ValidateChunkRows}
	if t.keepsDeleted() {
		c.match = t.uniqueKey(st)
	}
	if t.Type == "snap" {
		s1, s2 := snapTables(r.dest)
		err := withTx(ctx, r.dst, func(tx pgx.Tx) error {
			c.target, _, err = activeSnap(ctx, tx, r.dest, s1, s2)
			return err
		})
		if err != nil {
			return fail(err)
		}
	}
	if len(c.spec.Key) > 0 {
		// Both sides must order the key alike for their ranges to hold the
		// same rows: a text key under another collation is one chunk.
		sc, err := keyCollations(ctx, src, t.Source, c.spec.Key)
		if err != nil {
			return fail(err)
		}
		dc, err := keyCollations(ctx, r.dst, c.target, c.spec.Key)
		if err != nil {
			return fail(err)
		}
		if !slices.Equal(sc, dc) {
			c.note = fmt.Sprintf("the key orders differently on the two sides (collation %s on the source, %s here): compared as one chunk",
				strings.Join(sc, ", "), strings.Join(dc, ", "))
			c.spec.Key = nil
		}
	}
	if len(c.spec.Key) > 0 {
		ok, err := leadingIndex(ctx, r.dst, c.target, c.spec.Key)
		if err == nil && ok {
			ok, err = leadingIndex(ctx, src, t.Source, c.spec.Key)
		}
		if err != nil {
			return fail(err)
		}
		if !ok {
			c.note = fmt.Sprintf("no index on (%s) on both sides: compared as one chunk", strings.Join(keyNames(c.spec.Key), ", "))
			c.spec.Key = nil
		}
	}
	if t.Type == "logical" {
		return a.validateLogical(ctx, r, c, src, args)
	}
	return a.validateLocked(ctx, r, c, src, args.Repair)
}

// validateLocked validates a table that only this run writes (the table
// lock keeps refreshes out): both sides are read in one transaction each,
// the source's at one snapshot, and any repair is made in the destination
// transaction that records the result.
func (a *Agent) validateLocked(ctx context.Context, r *run, c *comparison, src *pgxpool.Conn, repair bool) error {
	fail := func(err error) error { return fmt.Errorf("validate %s: %w", r.dest, err) }
	stx, err := beginSnapshot(ctx, src)
	if err != nil {
		return fail(err)
	}
	defer func() { _ = stx.Rollback(context.WithoutCancel(ctx)) }()
	return withTx(ctx, r.dst, func(dtx pgx.Tx) error {
		if err := execAll(ctx, dtx, "set up the destination session", validate.Settings); err != nil {
			return fail(err)
		}
		if err := c.compare(ctx, r, stx, dtx); err != nil {
			return fail(err)
		}
		if len(c.differ) > 0 {
			if err := c.findPending(ctx, r, stx); err != nil {
				return fail(err)
			}
			if err := c.confirm(ctx, stx, dtx); err != nil {
				return fail(err)
			}
		}
		row := c.result()
		if repair && len(c.differ) > 0 {
			if err := r.step(ctx, "Repair", func() (string, error) {
				return c.repair(ctx, stx, dtx)
			}); err != nil {
				return fail(err)
			}
			if err := c.confirm(ctx, stx, dtx); err != nil {
				return fail(err)
			}
			row.Repaired = new(bool)
			*row.Repaired = len(c.differ) == 0
			row.Detail += c.repairDetail()
			r.committed = c.repaired
		}
		if err := recordCheck(ctx, dtx, r, row); err != nil {
			return err
		}
		return r.complete(ctx, dtx, c.repaired, row.message())
	})
}

// validateLogical validates a table the stream writes to: the source is
// read at a snapshot, the destination once the stream has applied
// everything committed before it. Changes that land meanwhile make chunks
// differ for a moment, so differing chunks are compared again, each time
// after the stream caught up, and count only when they differ every time.
// A repair copies the table again (refresh_logical's repull), the one way
// that cannot race the stream.
//
// A check the stream queued (args.Reason) that finds a difference fails the
// table: the copy went wrong in a way the stream cannot see.
func (a *Agent) validateLogical(ctx context.Context, r *run, c *comparison, src *pgxpool.Conn, args validateArgs) error {
	fail := func(err error) error { return fmt.Errorf("validate %s: %w", r.dest, err) }
	for pass := 0; pass <= logicalRechecks; pass++ {
		err := func() error {
			stx, err := beginSnapshot(ctx, src)
			if err != nil {
				return err
			}
			defer func() { _ = stx.Rollback(context.WithoutCancel(ctx)) }()
			lsn, err := walInsertLSN(ctx, stx)
			if err != nil {
				return err
			}
			if err := a.waitForStream(ctx, r, c.t.Dblink, lsn); err != nil {
				return err
			}
			return withTx(ctx, r.dst, func(dtx pgx.Tx) error {
				if err := execAll(ctx, dtx, "set up the destination session", validate.Settings); err != nil {
					return err
				}
				if pass == 0 {
					return c.compare(ctx, r, stx, dtx)
				}
				return c.recheck(ctx, stx, dtx)
			})
		}()
		if err != nil {
			return fail(err)
		}
		if len(c.differ) == 0 {
			break
		}
	}
	row := c.result()
	if args.Reason != "" {
		row.Detail = "checked because " + args.Reason + ": " + row.Detail
	}
	if args.Reason != "" && len(c.differ) > 0 && !args.Repair {
		why := "the copy differs from the source, " + row.Detail
		r.log.Error("logical table failed; it gets no changes until a repull", "error", why)
		if err := logical.MarkFailed(ctx, r.dst, r.req.DestTable, why+logical.RepullHint(r.req.DestTable)); err != nil {
			return fail(fmt.Errorf("mark the table failed: %w", err))
		}
	}
	if !args.Repair || len(c.differ) == 0 {
		return r.completeChecks(ctx, row.message(), row)
	}
	cfg, err := loadLogicalConfig(ctx, r.dst, r.req.DestTable)
	if err != nil {
		return fail(err)
	}
	row.Repaired = new(bool)
	*row.Repaired = true
	row.Detail += "; repaired: copied the whole table again (a logical table is repaired by a repull)"
	r.beforeComplete = func(ctx context.Context, tx pgx.Tx, message string) (string, error) {
		if err := recordCheck(ctx, tx, r, row); err != nil {
			return "", err
		}
		return row.message() + "; " + message, nil
	}
	if err := a.repullLogical(ctx, r, cfg); err != nil {
		return fail(fmt.Errorf("repair: %w", err))
	}
	return nil
}

// beginSnapshot starts the read-only transaction a check reads the source
// in: one snapshot for all its queries, with validate.Settings.
func beginSnapshot(ctx context.Context, src *pgxpool.Conn) (pgx.Tx, error) {
	tx, err := src.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, err
	}
	if err := execAll(ctx, tx, "set up the source session", validate.Settings); err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return nil, err
	}
	return tx, nil
}

// bothSides runs f on the source (stx, c.src) and the destination (dtx,
// c.dst) at once.
func bothSides[T any](ctx context.Context, c *comparison, stx, dtx pgx.Tx, f func(context.Context, pgx.Tx, validate.Side) (T, error)) (T, T, error) {
	var s, d T
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { s, err = f(gctx, stx, c.src); return err })
	g.Go(func() (err error) { d, err = f(gctx, dtx, c.dst); return err })
	err := g.Wait()
	return s, d, err
}

// compare plans the chunks on the source and sums them on both sides at
// once.
func (c *comparison) compare(ctx context.Context, r *run, stx, dtx pgx.Tx) error {
	return r.step(ctx, "Compare", func() (string, error) {
		var err error
		if c.chunks, err = validate.Plan(ctx, stx, c.spec, c.src); err != nil {
			return "", err
		}
		all := make([]int, len(c.chunks))
		for i := range all {
			all[i] = i
		}
		if err := c.sum(ctx, stx, dtx, all, true); err != nil {
			return "", err
		}
		msg := fmt.Sprintf("%d chunks: source %d rows, destination %d rows; %d chunks differ", len(c.chunks), c.srcRows, c.dstRows, len(c.differ))
		if c.note != "" {
			msg += " (" + c.note + ")"
		}
		return msg, nil
	})
}

// sum sums the chunks listed on both sides, concurrently, and keeps those
// that differ (counting the rows when total).
func (c *comparison) sum(ctx context.Context, stx, dtx pgx.Tx, which []int, total bool) error {
	chunks := make([]validate.Chunk, len(which))
	for i, w := range which {
		chunks[i] = c.chunks[w]
	}
	s, d, err := bothSides(ctx, c, stx, dtx, func(ctx context.Context, q pgx.Tx, side validate.Side) ([]validate.Sum, error) {
		return validate.Sums(ctx, q, c.spec, side, chunks, c.pending)
	})
	if err != nil {
		return err
	}
	c.differ = c.differ[:0]
	for i, w := range which {
		if total {
			c.srcRows += s[i].Rows
			c.dstRows += d[i].Rows
		}
		if s[i] != d[i] {
			c.differ = append(c.differ, w)
		}
	}
	return nil
}

// confirm compares the differing chunks again (pending changes left out)
// and, for the types that keep rows their source deleted, row by row.
func (c *comparison) confirm(ctx context.Context, stx, dtx pgx.Tx) error {
	if err := c.recheck(ctx, stx, dtx); err != nil {
		return err
	}
	if c.t.keepsDeleted() && len(c.differ) > 0 {
		return c.refineKept(ctx, stx, dtx)
	}
	return nil
}

// recheck sums the differing chunks again.
func (c *comparison) recheck(ctx context.Context, stx, dtx pgx.Tx) error {
	return c.sum(ctx, stx, dtx, append([]int(nil), c.differ...), false)
}

// findPending collects the keys in the differing chunks whose changes are
// not applied yet, as of the source snapshot: queued keys (dml, logdel),
// rows past last_value (updater). They are left out of the comparison; the
// next refresh brings them.
func (c *comparison) findPending(ctx context.Context, r *run, stx pgx.Tx) error {
	var from ident.Name
	var extra string
	switch {
	case c.t.Queue != nil:
		from = *c.t.Queue
		var truncated bool
		if err := stx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+from.Sanitize()+` WHERE `+ident.Quote(triggers.ColTruncated)+` IS NOT NULL)`).Scan(&truncated); err != nil {
			return fmt.Errorf("read the source queue %s: %w", from, err)
		}
		if truncated {
			// The next refresh prunes what the TRUNCATE emptied: until then
			// every chunk may differ, and none of it is wrong.
			c.note = "not compared: a TRUNCATE of the source is queued and not applied yet; refresh, then validate"
			c.differ, c.notCompared = nil, true
			return nil
		}
	case c.t.Type == "updater" && c.t.LastValue != nil:
		from = c.t.Source
		extra = c.t.pastLastValue()
	default:
		return nil
	}
	if len(c.spec.Key) == 0 {
		return nil
	}
	for _, i := range c.differ {
		keys, err := validate.Keys(ctx, stx, c.spec, from, c.chunks[i], extra, maxPending+1-len(c.pending))
		if err != nil {
			return fmt.Errorf("read pending changes from %s: %w", from, err)
		}
		c.pending = append(c.pending, keys...)
		if len(c.pending) > maxPending {
			return fmt.Errorf("more than %d changes of %s are not applied yet: refresh it, then validate", maxPending, r.dest)
		}
	}
	if len(c.pending) > 0 {
		r.note(ctx, "Pending changes", fmt.Sprintf("left out %d keys whose changes the next refresh applies", len(c.pending)), false)
	}
	return nil
}

// result is the check's row in mimeo.validation.
func (c *comparison) result() checkRow {
	row := checkRow{Dest: c.t.Dest.String(), Kind: "checksum", OK: len(c.differ) == 0,
		SourceRows: &c.srcRows, DestRows: &c.dstRows, Chunks: len(c.chunks), Differing: len(c.differ)}
	switch {
	case c.notCompared:
		row.Detail = fmt.Sprintf("source %d rows, destination %d; %s", c.srcRows, c.dstRows, c.note)
		return row
	case row.OK:
		row.Detail = fmt.Sprintf("%d rows in %s match", c.srcRows, plural(len(c.chunks), "chunk", "chunks"))
	default:
		row.Detail = fmt.Sprintf("%d of %s differ (source %d rows, destination %d)", len(c.differ), plural(len(c.chunks), "chunk", "chunks"), c.srcRows, c.dstRows)
		if len(c.spec.Key) > 0 && len(c.chunks) > 1 {
			first := c.chunks[c.differ[0]]
			row.Detail += "; first at " + describeChunk(c.spec, first)
		}
	}
	if len(c.pending) > 0 {
		row.Detail += fmt.Sprintf("; %d keys with changes not applied yet left out", len(c.pending))
	}
	row.Detail += c.describeKept()
	if c.note != "" {
		row.Detail += "; " + c.note
	}
	return row
}

func (c *comparison) repairDetail() string {
	if len(c.differ) == 0 {
		return fmt.Sprintf("; repaired: re-pulled %d rows, every chunk matches now", c.repaired)
	}
	return fmt.Sprintf("; repair re-pulled %d rows but %d chunks still differ (do the column types differ between source and destination?)",
		c.repaired, len(c.differ))
}

// describeChunk names a chunk's key range for a DBA.
func describeChunk(spec validate.Spec, c validate.Chunk) string {
	keys := strings.Join(keyNames(spec.Key), ", ")
	switch {
	case c.Lower == nil && c.Upper == nil:
		return "the whole table"
	case c.Lower == nil:
		return fmt.Sprintf("(%s) < (%s)", keys, strings.Join(c.Upper, ", "))
	case c.Upper == nil:
		return fmt.Sprintf("(%s) >= (%s)", keys, strings.Join(c.Lower, ", "))
	}
	return fmt.Sprintf("(%s) in [(%s), (%s))", keys, strings.Join(c.Lower, ", "), strings.Join(c.Upper, ", "))
}

func keyNames(key []validate.Column) []string {
	out := make([]string, len(key))
	for i, k := range key {
		out[i] = k.Name
	}
	return out
}

// leadingIndex reports whether rel has a valid btree index whose leading
// columns are key, in order (a view: never).
func leadingIndex(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, rel ident.Name, key []validate.Column) (bool, error) {
	var ok bool
	err := q.QueryRow(ctx, `
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
    JOIN pg_catalog.pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
    WHERE i.indrelid = to_regclass($1) AND i.indisvalid AND i.indpred IS NULL
      AND (SELECT array_agg(a.attname::text ORDER BY k.ord) FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           WHERE k.ord <= cardinality($2::text[])) = $2::text[])`,
		rel.Sanitize(), keyNames(key)).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("look up the indexes of %s: %w", rel, err)
	}
	return ok, nil
}

// keyCollations names the collation each key column sorts by on rel
// ("" for a type without one), the database's for "default".
func keyCollations(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, rel ident.Name, key []validate.Column) ([]string, error) {
	var out []string
	err := q.QueryRow(ctx, `
SELECT array_agg(CASE WHEN a.attcollation = 0 THEN ''
                      WHEN co.collname = 'default' THEN (SELECT d.datcollate FROM pg_catalog.pg_database d WHERE d.datname = current_database())
                      ELSE co.collname END ORDER BY k.ord)
FROM unnest($2::text[]) WITH ORDINALITY k(name, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = to_regclass($1) AND a.attname = k.name
LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation`, rel.Sanitize(), keyNames(key)).Scan(&out)
	if err != nil {
		return nil, fmt.Errorf("read the key's collation on %s: %w", rel, err)
	}
	return out, nil
}
