package logical

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// apply runs the batch's segments in order on tx: each as a few set-based
// statements whose rows travel as text arrays, cast on the destination.
// It returns the rows written.
func (b *tableBatch) apply(ctx context.Context, tx pgx.Tx) (int64, error) {
	var rows int64
	fail := func(err error) (int64, error) { return rows, &tableError{dest: b.plan.cfg.destText, err: err} }
	if d := b.plan.deferred; d != "" {
		if _, err := tx.Exec(ctx, "SET CONSTRAINTS "+d+" DEFERRED"); err != nil {
			return fail(err)
		}
	}
	for _, s := range b.segs {
		n, err := b.applySegment(ctx, tx, s)
		if err != nil {
			return fail(err)
		}
		rows += n
	}
	if d := b.plan.deferred; d != "" {
		// The batch ends where the source's order had every value unique.
		if _, err := tx.Exec(ctx, "SET CONSTRAINTS "+d+" IMMEDIATE"); err != nil {
			return fail(fmt.Errorf("check unique constraints: %w", err))
		}
	}
	b.segs = nil
	b.next()
	b.changes = 0
	return rows, nil
}

// arrays collects column-major text arrays and their unnest() list.
type arrays struct {
	args []any
	cols [][]*string
	text []byte // the rows in COPY's text format, when encoded ahead
}

// newArrays makes n columns with room for rows values each.
func newArrays(n, rows int) *arrays {
	a := &arrays{cols: make([][]*string, n)}
	for i := range a.cols {
		a.cols[i] = make([]*string, 0, rows)
	}
	return a
}

// len is the number of rows held.
func (a *arrays) len() int {
	if len(a.cols) == 0 {
		return 0
	}
	return len(a.cols[0])
}

// unnest is "unnest($1::text[], ...) AS u(c0, ...)", numbering parameters
// from first+1.
func (a *arrays) unnest(first int) string {
	var p, names []string
	for i := range a.cols {
		p = append(p, "$"+strconv.Itoa(first+i+1)+"::text[]")
		names = append(names, "c"+strconv.Itoa(i))
	}
	return "unnest(" + strings.Join(p, ", ") + ") AS u(" + strings.Join(names, ", ") + ")"
}

func (a *arrays) params() []any {
	out := make([]any, len(a.cols))
	for i, c := range a.cols {
		out[i] = c
	}
	return out
}

// keyMatch is `d.k1 = u.c<o>::t1 AND ...` for the key columns held in
// arrays from offset o.
func (p *plan) keyMatch(o int) string {
	var parts []string
	for i, k := range p.keys {
		parts = append(parts, "d."+ident.Quote(k.name)+" = u.c"+strconv.Itoa(o+i)+"::"+k.typ)
	}
	return strings.Join(parts, " AND ")
}

func (b *tableBatch) applySegment(ctx context.Context, tx pgx.Tx, s *segment) (int64, error) {
	p := b.plan
	d := p.cfg.dest.Sanitize()
	live := p.liveOnly()
	var rows int64
	if s.truncate {
		if err := p.truncate(ctx, tx, s.truncateAt); err != nil {
			return 0, err
		}
	}
	if s.move != nil {
		return p.applyMove(ctx, tx, s.moveFrom, s.move)
	}
	// Deletes: a removed key loses its row (logdel: its live row); a full
	// row replaces what its key has in the merge below.
	pr := p.prepare(s)
	for i, set := range pr.removed {
		if set == nil {
			continue
		}
		from, args, err := p.stages.rows(ctx, tx, set)
		if err != nil {
			return 0, err
		}
		q := "DELETE FROM " + d + " d USING " + from + " WHERE " + p.keyMatch(0)
		if i == 1 {
			q += live
		}
		if _, err := tx.Exec(ctx, q, args...); err != nil {
			return 0, fmt.Errorf("delete changed rows: %w", err)
		}
	}
	n, err := p.insertFull(ctx, tx, s)
	if err != nil {
		return 0, err
	}
	rows += n
	if n, err = p.updatePartial(ctx, tx, s, live); err != nil {
		return 0, err
	}
	rows += n
	if n, err = p.markDeleted(ctx, tx, s, live); err != nil {
		return 0, err
	}
	return rows + n, nil
}

// liveOnly restricts a statement on the destination (alias d) to live rows
// in a logdel-flavoured table.
func (p *plan) liveOnly() string {
	if !p.cfg.logdel {
		return ""
	}
	return " AND d." + ident.Quote(DeletedColumn) + " IS NULL"
}

// keyArrays puts keys into column-major arrays.
func (p *plan) keyArrays(keys [][]*string) *arrays {
	a := newArrays(len(p.keys), len(keys))
	for _, k := range keys {
		for i := range p.keys {
			a.cols[i] = append(a.cols[i], k[i])
		}
	}
	return a
}

// truncate empties the table (logdel: marks its live rows deleted).
func (p *plan) truncate(ctx context.Context, tx pgx.Tx, at string) error {
	d := p.cfg.dest.Sanitize()
	if p.cfg.logdel {
		if _, err := tx.Exec(ctx, "UPDATE "+d+" SET "+ident.Quote(DeletedColumn)+" = $1::timestamptz WHERE "+ident.Quote(DeletedColumn)+" IS NULL", at); err != nil {
			return fmt.Errorf("mark rows deleted by TRUNCATE: %w", err)
		}
		return nil
	}
	// TRUNCATE needs more than DML rights: a table handed to another
	// role is emptied with DELETE instead.
	if _, err := tx.Exec(ctx, "SAVEPOINT mimeo_truncate"); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "TRUNCATE "+d); err != nil {
		if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT mimeo_truncate"); rerr != nil {
			return rerr
		}
		if _, err := tx.Exec(ctx, "DELETE FROM "+d); err != nil {
			return fmt.Errorf("apply TRUNCATE: %w", err)
		}
		return nil
	}
	_, err := tx.Exec(ctx, "RELEASE SAVEPOINT mimeo_truncate")
	return err
}

// insertFull inserts the segment's full rows; with a condition only those
// it admits (it is evaluated over every source column).
func (p *plan) insertFull(ctx context.Context, tx pgx.Tx, s *segment) (int64, error) {
	return p.insertRows(ctx, tx, s, true, true)
}

// inCondition names the staged rows' condition result.
const inCondition = "mimeo in condition?"

// mergeSQL upserts the staged full rows: a key the destination has is
// updated in place (HOT where no indexed column changed, far cheaper than
// a delete and an insert), one it lacks is inserted; with a condition, a
// row outside it is deleted or left out.
func (p *plan) mergeSQL(picks []string, unnest, cond string) string {
	stage := "(SELECT " + strings.Join(picks, ", ") + " FROM " + unnest + ") s"
	matched, inserted := "", ""
	if cond != "" {
		stage = "(SELECT s0.*, (" + cond + ") AS " + ident.Quote(inCondition) + " FROM " + strings.TrimSuffix(stage, " s") + " s0) s"
		matched = " AND s." + ident.Quote(inCondition) + " IS TRUE"
		inserted = matched
	}
	var on, sets, cols, vals []string
	for _, k := range p.keys {
		on = append(on, "t."+ident.Quote(k.name)+" = s."+ident.Quote(k.name))
	}
	for _, c := range p.cols {
		q := ident.Quote(c.name)
		cols = append(cols, q)
		vals = append(vals, "s."+q)
		if !slices.ContainsFunc(p.keys, func(k planCol) bool { return k.name == c.name }) {
			sets = append(sets, q+" = s."+q)
		}
	}
	if p.cfg.logdel {
		q := ident.Quote(DeletedColumn)
		cols, vals, sets = append(cols, q), append(vals, "s."+q), append(sets, q+" = s."+q)
	}
	update := "UPDATE SET " + strings.Join(sets, ", ")
	if len(sets) == 0 {
		update = "DO NOTHING"
	}
	q := "MERGE INTO " + p.cfg.dest.Sanitize() + " t USING " + stage + " ON " + strings.Join(on, " AND ") +
		" WHEN MATCHED" + matched + " THEN " + update
	if cond != "" {
		q += " WHEN MATCHED THEN DELETE"
	}
	return q + " WHEN NOT MATCHED" + inserted + " THEN INSERT (" + strings.Join(cols, ", ") + ") VALUES (" + strings.Join(vals, ", ") + ")"
}

// insertRows inserts the segment's full rows, through the condition when
// withCondition.
func (p *plan) insertRows(ctx context.Context, tx pgx.Tx, s *segment, withCondition, merge bool) (int64, error) {
	cond := p.cfg.condition
	if !withCondition {
		cond = ""
	}
	var a *arrays
	var srcCols []int // relation columns staged
	if withCondition && s.prep != nil {
		a, srcCols = s.prep.full, s.prep.fullCols
	} else {
		a, srcCols = p.fullRows(s, cond != "")
	}
	if a == nil {
		return 0, nil
	}
	from, args, err := p.stages.rows(ctx, tx, a)
	if err != nil {
		return 0, err
	}
	var picks, names []string
	for i, j := range srcCols {
		typ := p.relTypes[j]
		if cond == "" {
			typ = p.cols[i].typ // the destination's own type
		}
		picks = append(picks, "u.c"+strconv.Itoa(i)+"::"+typ+" AS "+ident.Quote(p.rel.columns[j].name))
	}
	for _, c := range p.cols {
		names = append(names, ident.Quote(c.name))
	}
	target := strings.Join(names, ", ")
	if p.cfg.logdel {
		picks = append(picks, "u.c"+strconv.Itoa(len(srcCols))+"::timestamptz AS "+ident.Quote(DeletedColumn))
		target += ", " + ident.Quote(DeletedColumn)
	}
	q := "INSERT INTO " + p.cfg.dest.Sanitize() + " (" + target + ") SELECT " + target + " FROM (SELECT " + strings.Join(picks, ", ") +
		" FROM " + from + ") s"
	if cond != "" {
		q += " WHERE " + cond
	}
	if merge {
		q = p.mergeSQL(picks, from, cond)
	}
	tag, err := tx.Exec(ctx, q, args...)
	if err != nil {
		return 0, fmt.Errorf("insert changed rows: %w", err)
	}
	return tag.RowsAffected(), nil
}

// fullRows puts the segment's full rows into arrays (nil when it has
// none): the destination's columns, or with the condition every relation
// column; and last, when each was deleted (logdel). It also returns the
// relation columns held.
func (p *plan) fullRows(s *segment, withCondition bool) (*arrays, []int) {
	var srcCols []int
	if withCondition {
		for i := range p.rel.columns {
			srcCols = append(srcCols, i)
		}
	} else {
		for _, c := range p.cols {
			srcCols = append(srcCols, c.src)
		}
	}
	count := s.count(rowFull)
	if count == 0 {
		return nil, srcCols
	}
	a := newArrays(len(srcCols)+1, count)
	for _, k := range s.order {
		op := s.ops[k]
		if op.kind != rowFull {
			continue
		}
		for i, j := range srcCols {
			var v *string
			if j < len(op.tuple) {
				v = op.tuple[j]
			}
			a.cols[i] = append(a.cols[i], v)
		}
		a.cols[len(srcCols)] = append(a.cols[len(srcCols)], op.deletedAt)
	}
	return a, srcCols
}

// prepared is a segment's rows in arrays, built (and encoded for a staging
// table) before its statements run: for a piece of a large transaction,
// while the piece before it runs on the destination.
type prepared struct {
	removed  [2]*arrays // keys removed: every row's, live rows' only (logdel)
	full     *arrays    // full rows, through the condition (insertFull)
	fullCols []int      // the relation columns full holds
}

// prepare builds the segment's arrays, once.
func (p *plan) prepare(s *segment) *prepared {
	if s.prep != nil {
		return s.prep
	}
	pr := &prepared{}
	var sets [2][][]*string
	for _, k := range s.order {
		if op := s.ops[k]; op.kind == rowRemove {
			i := 0
			if p.cfg.logdel {
				i = 1
			}
			sets[i] = append(sets[i], op.key)
		}
	}
	for i, set := range sets {
		if len(set) > 0 {
			pr.removed[i] = p.keyArrays(set)
		}
	}
	pr.full, pr.fullCols = p.fullRows(s, p.cfg.condition != "")
	s.prep = pr
	return pr
}

// prepare builds the arrays of the batch's segments and encodes those
// large enough to be staged. It only reads the plan, so it may run while
// another batch's statements do.
func (b *tableBatch) prepare() {
	for _, s := range b.segs {
		if s.move != nil {
			continue
		}
		pr := b.plan.prepare(s)
		for _, a := range []*arrays{pr.removed[0], pr.removed[1], pr.full} {
			a.encodeAhead()
		}
	}
}

// updatePartial updates rows whose UPDATE left TOASTed values unchanged:
// one statement per set of columns sent.
func (p *plan) updatePartial(ctx context.Context, tx pgx.Tx, s *segment, live string) (int64, error) {
	groups := map[string][]*rowOp{}
	var order []string
	for _, k := range s.order {
		op := s.ops[k]
		if op.kind != rowPartial {
			continue
		}
		sig := p.sentSignature(op.unchanged)
		if _, ok := groups[sig]; !ok {
			order = append(order, sig)
		}
		groups[sig] = append(groups[sig], op)
	}
	if p.cfg.condition != "" {
		// Whether the row is in the condition now may depend on values the
		// stream lacks (unchanged TOAST) or does not copy (p_filter): the
		// source says, and gives the row whole.
		var keys [][]*string
		for _, sig := range order {
			keys = append(keys, opKeys(groups[sig])...)
		}
		return int64(len(keys)), p.fetchRows(ctx, tx, keys)
	}
	var rows int64
	for _, sig := range order {
		ops := groups[sig]
		n, err := p.updateRows(ctx, tx, ops, nil, live)
		if err != nil {
			return rows, err
		}
		rows += n
	}
	return rows, nil
}

// sentSignature names which destination columns an UPDATE sent.
func (p *plan) sentSignature(unchanged []bool) string {
	var sb strings.Builder
	for _, c := range p.cols {
		if c.src < len(unchanged) && unchanged[c.src] {
			sb.WriteByte('u')
		} else {
			sb.WriteByte('s')
		}
	}
	return sb.String()
}

// updateRows sets the sent columns of ops' rows (all of one signature),
// found by their key or, for a move, by from. A row the destination lacks
// means the copy is out of step: the table fails, unless a condition may
// have kept the row out.
func (p *plan) updateRows(ctx context.Context, tx pgx.Tx, ops []*rowOp, from [][]*string, live string) (int64, error) {
	first := ops[0]
	var sent []planCol
	for _, c := range p.cols {
		if !(c.src < len(first.unchanged) && first.unchanged[c.src]) {
			sent = append(sent, c)
		}
	}
	if len(sent) == 0 {
		return 0, nil
	}
	a := newArrays(len(p.keys)+len(sent), len(ops))
	for n, op := range ops {
		key := op.key
		if from != nil {
			key = from[n]
		}
		for i := range p.keys {
			a.cols[i] = append(a.cols[i], key[i])
		}
		for i, c := range sent {
			a.cols[len(p.keys)+i] = append(a.cols[len(p.keys)+i], op.tuple[c.src])
		}
	}
	rows, args, err := p.stages.rows(ctx, tx, a)
	if err != nil {
		return 0, err
	}
	var sets []string
	for i, c := range sent {
		sets = append(sets, ident.Quote(c.name)+" = u.c"+strconv.Itoa(len(p.keys)+i)+"::"+c.typ)
	}
	d := p.cfg.dest.Sanitize()
	update := "UPDATE " + d + " d SET " + strings.Join(sets, ", ") + " FROM " + rows + " WHERE " + p.keyMatch(0) + live
	tag, err := tx.Exec(ctx, update, args...)
	if err != nil {
		return 0, fmt.Errorf("update changed rows: %w", err)
	}
	if tag.RowsAffected() < int64(len(ops)) {
		return 0, fmt.Errorf("the source updated %d rows the destination does not have: the copy is out of step with the source", int64(len(ops))-tag.RowsAffected())
	}
	return tag.RowsAffected(), nil
}

// fetchRows replaces the rows of keys with the source's rows of those keys
// that the condition admits, as they are now (later changes in the stream
// apply on top).
func (p *plan) fetchRows(ctx context.Context, tx pgx.Tx, keys [][]*string) error {
	if p.src == nil {
		return fmt.Errorf("%d updated rows are missing from the destination", len(keys))
	}
	ka := p.keyArrays(keys)
	var cols, match []string
	for _, c := range p.cols {
		cols = append(cols, "s."+ident.Quote(c.name)+"::text")
	}
	for i, k := range p.keys {
		match = append(match, "s."+ident.Quote(k.name)+" = u.c"+strconv.Itoa(i)+"::"+p.relTypes[k.src])
	}
	rows, err := p.src.Query(ctx, "SELECT "+strings.Join(cols, ", ")+" FROM "+p.cfg.source.Sanitize()+" s, "+ka.unnest(0)+
		" WHERE "+strings.Join(match, " AND ")+" AND ("+p.cfg.condition+")", ka.params()...)
	if err != nil {
		return fmt.Errorf("read rows that entered the condition from the source: %w", err)
	}
	seg := &segment{ops: map[string]*rowOp{}}
	for rows.Next() {
		vals := make([]*string, len(p.cols))
		ptrs := make([]any, len(vals))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			rows.Close()
			return err
		}
		tuple := make([]*string, len(p.rel.columns))
		for i, c := range p.cols {
			tuple[c.src] = vals[i]
		}
		key, k := p.keyOf(tuple)
		seg.put(k, &rowOp{kind: rowFull, key: key, tuple: tuple})
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read rows that entered the condition from the source: %w", err)
	}
	// What the keys have goes (logdel: their live rows; a row out of the
	// condition leaves the copy), then the source's rows come in.
	live := p.liveOnly()
	from, args, err := p.stages.rows(ctx, tx, ka)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "DELETE FROM "+p.cfg.dest.Sanitize()+" d USING "+from+" WHERE "+p.keyMatch(0)+live, args...); err != nil {
		return fmt.Errorf("replace updated rows: %w", err)
	}
	if len(seg.order) == 0 {
		return nil
	}
	_, err = p.insertRows(ctx, tx, seg, false, false)
	return err
}

func opKeys(ops []*rowOp) [][]*string {
	out := make([][]*string, len(ops))
	for i, op := range ops {
		out[i] = op.key
	}
	return out
}

// markDeleted marks the live rows of deleted keys (logdel).
func (p *plan) markDeleted(ctx context.Context, tx pgx.Tx, s *segment, live string) (int64, error) {
	count := s.count(rowMark)
	if count == 0 {
		return 0, nil
	}
	a := newArrays(len(p.keys)+1, count)
	for _, k := range s.order {
		op := s.ops[k]
		if op.kind != rowMark {
			continue
		}
		for i := range p.keys {
			a.cols[i] = append(a.cols[i], op.key[i])
		}
		a.cols[len(p.keys)] = append(a.cols[len(p.keys)], op.deletedAt)
	}
	from, args, err := p.stages.rows(ctx, tx, a)
	if err != nil {
		return 0, err
	}
	tag, err := tx.Exec(ctx, "UPDATE "+p.cfg.dest.Sanitize()+" d SET "+ident.Quote(DeletedColumn)+" = u.c"+strconv.Itoa(len(p.keys))+
		"::timestamptz FROM "+from+" WHERE "+p.keyMatch(0)+live, args...)
	if err != nil {
		return 0, fmt.Errorf("mark deleted rows: %w", err)
	}
	return tag.RowsAffected(), nil
}

// applyMove applies an UPDATE that changed a row's key while leaving
// TOASTed values unchanged: the row moves to its new key in place.
func (p *plan) applyMove(ctx context.Context, tx pgx.Tx, from []*string, op *rowOp) (int64, error) {
	d := p.cfg.dest.Sanitize()
	// Whatever the new key has (logdel: a deleted row) gives way.
	ka := p.keyArrays([][]*string{op.key})
	if _, err := tx.Exec(ctx, "DELETE FROM "+d+" d USING "+ka.unnest(0)+" WHERE "+p.keyMatch(0), ka.params()...); err != nil {
		return 0, fmt.Errorf("apply key change: %w", err)
	}
	live := p.liveOnly()
	if p.cfg.condition != "" {
		fa := p.keyArrays([][]*string{from})
		if _, err := tx.Exec(ctx, "DELETE FROM "+d+" d USING "+fa.unnest(0)+" WHERE "+p.keyMatch(0)+live, fa.params()...); err != nil {
			return 0, fmt.Errorf("apply key change: %w", err)
		}
		return 1, p.fetchRows(ctx, tx, [][]*string{op.key})
	}
	return p.updateRows(ctx, tx, []*rowOp{op}, [][]*string{from}, live)
}
