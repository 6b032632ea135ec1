package logical

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/internal/owner"
)

// applier applies the stream's transactions to the destination, the only
// writer of its tables and of applied_lsn. Small source transactions are
// gathered (whole) into one destination transaction; one larger than the
// memory budget is applied in pieces inside one.
type applier struct {
	s      *stream
	rels   map[uint32]*relation
	types  map[*relation][]string
	plans  map[string]*plan // by destination table
	shapes map[string]string

	applied   pglogrepl.LSN // stored in mimeo.logical_source.applied_lsn
	storedAt  time.Time
	lastIdle  time.Time
	lastCheck time.Time
	warned    bool
	syncWant  pglogrepl.LSN

	// The destination transaction being built.
	tx       pgx.Tx
	inflight chan error // a piece's statements running in tx (then tx is theirs), and their result
	stages   *stages
	targets  map[*relation][]*target
	batches  map[string]*tableBatch
	backlog  []backlogRow
	size     int
	changes  int
}

// target is one destination table a relation's changes go to in the
// current transaction.
type target struct {
	cfg  *tableConfig
	plan *plan // ready tables only
}

func newApplier(s *stream) *applier {
	return &applier{s: s, rels: map[uint32]*relation{}, types: map[*relation][]string{}, plans: map[string]*plan{},
		shapes: map[string]string{}, applied: s.start, storedAt: time.Now(), stages: newStages()}
}

// run consumes the receiver's batches until ctx ends or an error.
func (a *applier) run(ctx context.Context, items *handover) error {
	r := &runner{a: a}
	defer func() {
		_ = a.settle() // its error is the stream's end already, or moot
		a.rollback(ctx)
	}()
	idle := time.NewTicker(250 * time.Millisecond)
	defer idle.Stop()
	for {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case batch := <-items.ch:
			// Data has arrived (a keepalive alone is the walsender
			// answering the applier's own requests).
			if _, alone := batch[0].(marker); r.stx != nil && (len(batch) > 1 || !alone) {
				r.lastData = time.Now()
			}
			for i, item := range batch {
				// More is coming when this batch or the hand-over holds it.
				more := i < len(batch)-1 || items.pending()
				if err := r.handle(ctx, item, more); err != nil {
					return err
				}
			}
			items.done(batch)
		case <-r.linger:
			r.linger = nil
			if r.cur == nil && !r.large {
				if err := r.flushGroup(ctx); err != nil {
					return err
				}
			}
		case <-idle.C:
			// Not idle while batches wait: one applied for long is not
			// the source idling.
			if !items.pending() {
				if err := r.streamIdle(); err != nil {
					return err
				}
			}
			if r.cur == nil && !r.large {
				if err := r.flushGroup(ctx); err != nil {
					return err
				}
				if err := a.idleDuties(ctx); err != nil {
					return err
				}
			}
		}
	}
}

// runner is the applier's state between messages.
type runner struct {
	a       *applier
	cur     *txn   // the transaction being received
	group   []*txn // complete transactions not applied yet
	size    int
	large   bool      // cur (or stx) is being applied in pieces, in a.tx
	largeAt time.Time // when its first piece was applied
	// stx is the streamed transaction open, if any: cur while one of its
	// blocks arrives.
	stx      *txn
	lastData time.Time // when stx began, or last a batch with data came while it is open
	// A group waits up to lingerMax for more transactions once the
	// stream runs dry: one destination transaction then carries
	// several, instead of one each at a rate it cannot keep up with.
	linger     <-chan time.Time
	groupStart time.Time
	pending    pglogrepl.LSN // a keepalive's position that arrived behind the group
}

// applyPiece folds a piece of the large transaction cur (its changes so
// far) into batches of its own, then has them applied in the background:
// the destination runs one piece's statements while the next is decoded
// and folded. One piece is applied at a time.
func (r *runner) applyPiece(ctx context.Context, cur *txn) error {
	a := r.a
	part := *cur
	cur.changes, cur.size = make([]change, 0, len(part.changes)), 0
	err := a.feed(ctx, &part)
	if err == nil {
		a.prepare()
		err = a.settle()
	}
	if err != nil && cur.streamed {
		// The source has not committed it: the stream without
		// streaming decides, once it has, what fails.
		r.abandon(ctx)
		if !errors.Is(err, errUnstreamed) {
			err = unstreamed(err.Error())
		}
		return err
	}
	if err != nil {
		return a.failed(ctx, err)
	}
	batches, backlog := a.batches, a.backlog
	a.batches, a.backlog = map[string]*tableBatch{}, nil
	done := make(chan error, 1)
	a.inflight = done
	go func() { done <- a.applyBatches(ctx, batches, backlog) }()
	return nil
}

// flushGroup applies the group, then a keepalive position held behind it.
func (r *runner) flushGroup(ctx context.Context) error {
	r.linger = nil
	if len(r.group) == 0 {
		return nil
	}
	err := r.a.applyGroup(ctx, r.group)
	r.group, r.size = nil, 0
	if err != nil {
		return err
	}
	if r.pending > r.a.applied {
		err = r.a.advance(ctx, r.pending)
	}
	r.pending = 0
	return err
}

// handle takes one message; more says whether others follow at once.
func (r *runner) handle(ctx context.Context, item any, more bool) error {
	a := r.a
	switch m := item.(type) {
	case *pglogrepl.RelationMessage:
		a.rels[m.RelationID] = relationOf(m)
	case *pglogrepl.BeginMessage:
		if r.stx != nil && r.large {
			return unstreamed("another source transaction committed while a streamed one is applied")
		}
		// A transaction applied before a restart may be sent again.
		r.cur = &txn{commitLSN: m.FinalLSN, commitAt: m.CommitTime, skip: m.FinalLSN < a.applied}
	case *streamStart:
		return r.streamStart(ctx, m)
	case streamStop:
		r.streamStop()
	case *pglogrepl.StreamCommitMessageV2:
		return r.streamCommit(ctx, m, more)
	case *pglogrepl.StreamAbortMessageV2:
		return r.streamAbort(ctx, m)
	case *rowMessage, *pglogrepl.TruncateMessage:
		cur := r.cur
		if cur == nil {
			return errors.New("pgoutput sent a change outside a transaction")
		}
		if cur.skip {
			return nil
		}
		n, err := a.decode(m, cur)
		if err != nil {
			return err
		}
		cur.size += n
		if cur.size < a.pieceSize() {
			return nil
		}
		// Large: apply it in pieces as it arrives, inside one
		// destination transaction that commits with the source's (the
		// receiver reads, and the applier decodes and folds, the next
		// piece meanwhile; memory stays bounded).
		if !r.large {
			if err := r.flushGroup(ctx); err != nil {
				return err
			}
			if err := a.begin(ctx); err != nil {
				return err
			}
			r.large, r.largeAt = true, time.Now()
			if cur.streamed {
				a.s.log.Info("applying a large source transaction in pieces as it is streamed", "xid", cur.xid)
			} else {
				a.s.log.Info("applying a large source transaction in pieces", "commit_lsn", cur.commitLSN.String())
			}
		}
		return r.applyPiece(ctx, cur)
	case *pglogrepl.CommitMessage:
		done := r.cur
		if done == nil || done.streamed {
			return errors.New("pgoutput sent a commit outside a transaction")
		}
		r.cur = nil
		if done.skip {
			return nil
		}
		return r.committed(ctx, done, m.TransactionEndLSN, m.CommitTime, more)
	case marker:
		if r.cur != nil || r.stx != nil {
			return nil
		}
		if len(r.group) > 0 {
			// The walsender says where it is after nearly every
			// transaction while the source is busy: that must not
			// cut the group short. It counts once the group is in.
			r.pending = max(r.pending, m.lsn)
			return nil
		}
		if err := a.advance(ctx, max(r.pending, m.lsn)); err != nil {
			return err
		}
		r.pending = 0
	}
	return nil
}

// committed applies a transaction whose commit has arrived: the rest of a
// large one, then its commit; a smaller one joins the group.
func (r *runner) committed(ctx context.Context, done *txn, endLSN pglogrepl.LSN, commitAt time.Time, more bool) error {
	a := r.a
	done.endLSN, done.commitAt = endLSN, commitAt
	if r.large {
		r.large = false
		if err := a.feed(ctx, done); err != nil {
			return a.failed(ctx, err)
		}
		if err := a.commit(ctx, []*txn{done}); err != nil {
			return a.failed(ctx, err)
		}
		a.s.log.Info("applied a large source transaction", "commit_lsn", done.commitLSN.String(), "changes", a.changes,
			"duration", time.Since(r.largeAt).Round(time.Millisecond).String())
		return nil
	}
	if len(r.group) == 0 {
		r.groupStart = time.Now()
	}
	r.group = append(r.group, done)
	r.size += done.size
	waited := time.Since(r.groupStart)
	switch {
	case r.size >= a.s.e.cfg.MemoryBudget || len(r.group) >= 1000 || (!more && waited >= lingerMax):
		return r.flushGroup(ctx)
	case !more && r.linger == nil:
		r.linger = time.After(lingerMax - waited)
	}
	return nil
}

// lingerMax is how long a group of transactions waits for more once the
// stream has nothing more to hand over.
const lingerMax = 5 * time.Millisecond

// pieceSize is the bytes of one transaction held before it is applied in
// pieces: a quarter of the budget, so receiving overlaps applying, and at
// most 1 MB, so that little is left to apply once its commit arrives.
func (a *applier) pieceSize() int { return max(min(a.s.e.cfg.MemoryBudget/4, 1<<20), 16<<10) }

// relationOf converts a Relation message.
func relationOf(m *pglogrepl.RelationMessage) *relation {
	r := &relation{id: m.RelationID, schema: m.Namespace, table: m.RelationName}
	for _, c := range m.Columns {
		r.columns = append(r.columns, relColumn{name: c.Name, typeID: c.DataType, typmod: c.TypeModifier, key: c.Flags&1 != 0})
	}
	return r
}

// decode appends a change message to t and returns the bytes it holds.
func (a *applier) decode(msg any, t *txn) (int, error) {
	rel := func(id uint32) (*relation, error) {
		r, ok := a.rels[id]
		if !ok {
			return nil, fmt.Errorf("pgoutput sent a change of relation %d before describing it", id)
		}
		return r, nil
	}
	switch m := msg.(type) {
	case *rowMessage:
		r, err := rel(m.relID)
		if err != nil {
			return 0, err
		}
		t.changes = append(t.changes, change{op: m.op, rel: r, old: m.old, new: m.new, unchanged: m.unchanged})
		return m.size, nil
	case *pglogrepl.TruncateMessage:
		for _, id := range m.RelationIDs {
			r, err := rel(id)
			if err != nil {
				return 0, err
			}
			t.changes = append(t.changes, change{op: opTruncate, rel: r})
		}
		return 16, nil
	}
	return 0, nil
}

// begin opens the destination transaction.
func (a *applier) begin(ctx context.Context) error {
	if a.tx != nil {
		return nil
	}
	tx, err := a.s.dst.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin destination transaction: %w", err)
	}
	a.tx = tx
	a.stages.begin()
	a.targets = map[*relation][]*target{}
	a.batches = map[string]*tableBatch{}
	a.backlog = nil
	a.changes = 0
	return nil
}

// rollback abandons the destination transaction, if any.
func (a *applier) rollback(ctx context.Context) {
	if a.tx != nil {
		_ = a.tx.Rollback(context.WithoutCancel(ctx))
		a.tx = nil
		a.stages.rollback()
	}
}

// applyGroup applies whole transactions in one destination transaction.
func (a *applier) applyGroup(ctx context.Context, group []*txn) error {
	start := time.Now()
	defer func() {
		a.s.log.Trace("applied source transactions", "transactions", len(group), "changes", a.changes, "duration", time.Since(start).String())
	}()
	if err := a.begin(ctx); err != nil {
		return err
	}
	for _, t := range group {
		if err := a.feed(ctx, t); err != nil {
			return a.failed(ctx, err)
		}
	}
	if err := a.commit(ctx, group); err != nil {
		return a.failed(ctx, err)
	}
	return nil
}

// feed routes a transaction's held changes to the tables they go to.
func (a *applier) feed(ctx context.Context, t *txn) error {
	at := t.commitAt.UTC().Format(time.RFC3339Nano)
	uncommitted := t.streamed && t.commitLSN == 0 // a streamed piece: see streamable
	for _, c := range t.changes {
		targets, err := a.targetsOf(ctx, c.rel)
		if err != nil {
			return err
		}
		for _, tg := range targets {
			switch tg.cfg.state {
			case "ready":
				if uncommitted {
					if err := streamable(t, tg); err != nil {
						return err
					}
				} else if t.commitLSN < tg.cfg.startLSN {
					continue // in the table's copy already
				}
				if tg.plan == nil || tg.plan.rel != c.rel {
					if err := a.replan(ctx, tg, c.rel); err != nil {
						return err
					}
				}
				b := a.batches[tg.cfg.destText]
				if b == nil || b.plan != tg.plan {
					if b != nil && !b.empty() {
						if err := a.settle(); err != nil {
							return err
						}
						if _, err := b.apply(ctx, a.tx); err != nil {
							return err
						}
					}
					b = newTableBatch(tg.plan, len(t.changes))
					a.batches[tg.cfg.destText] = b
				}
				b.add(c, at)
			case "copying", "copied":
				if uncommitted {
					return streamable(t, tg)
				}
				a.backlog = append(a.backlog, backlogOf(tg.cfg.destText, t, c))
			}
			a.changes++
		}
	}
	return nil
}

// targetsOf returns, reading them once per destination transaction, the
// tables rel's changes go to.
func (a *applier) targetsOf(ctx context.Context, rel *relation) ([]*target, error) {
	if t, ok := a.targets[rel]; ok {
		return t, nil
	}
	if err := a.settle(); err != nil {
		return nil, err
	}
	cfgs, err := readTargets(ctx, a.tx, a.s.dblink, ident.Name{Schema: rel.schema, Table: rel.table})
	if err != nil {
		return nil, err
	}
	var out []*target
	for _, c := range cfgs {
		tg := &target{cfg: c}
		if p := a.plans[c.destText]; p != nil && a.shapes[c.destText] == c.shape() && p.rel == rel {
			p.cfg = c
			tg.plan = p
		}
		out = append(out, tg)
	}
	a.targets[rel] = out
	return out, nil
}

// replan builds the plan of a target for rel.
func (a *applier) replan(ctx context.Context, tg *target, rel *relation) error {
	if err := a.settle(); err != nil {
		return err
	}
	types, ok := a.types[rel]
	if !ok {
		var err error
		if types, err = relationTypes(ctx, a.s.src, rel); err != nil {
			return err
		}
		a.types[rel] = types
	}
	p, err := a.buildPlan(ctx, tg.cfg, rel, types)
	if err != nil {
		return err
	}
	tg.plan = p
	a.plans[tg.cfg.destText] = p
	a.shapes[tg.cfg.destText] = tg.cfg.shape()
	return nil
}

// buildPlan builds, in the current transaction, the plan of cfg for rel;
// its statements use the stream's staging tables.
func (a *applier) buildPlan(ctx context.Context, cfg *tableConfig, rel *relation, types []string) (*plan, error) {
	p, err := buildPlan(ctx, a.tx, a.s.src, cfg, rel, types)
	if err != nil {
		return nil, err
	}
	p.stages = a.stages
	return p, nil
}

// settle waits for the piece whose statements run in the background, if
// any, and returns their error; a.tx is the caller's again.
func (a *applier) settle() error {
	if a.inflight == nil {
		return nil
	}
	err := <-a.inflight
	a.inflight = nil
	if err != nil {
		return err
	}
	return a.s.fault("applied a piece")
}

// prepare builds the batches' arrays, while a piece may still run.
func (a *applier) prepare() {
	for _, b := range a.batches {
		b.prepare()
	}
}

// flushBatches applies what the batches hold, inside the transaction.
func (a *applier) flushBatches(ctx context.Context) error {
	a.prepare()
	if err := a.settle(); err != nil {
		return err
	}
	if err := a.applyBatches(ctx, a.batches, a.backlog); err != nil {
		return err
	}
	a.backlog = a.backlog[:0]
	return nil
}

// applyBatches applies batches and backlog rows in tx.
func (a *applier) applyBatches(ctx context.Context, batches map[string]*tableBatch, backlog []backlogRow) error {
	names := make([]string, 0, len(batches))
	for n := range batches {
		names = append(names, n)
	}
	slices.Sort(names) // one order for every stream: no deadlocks between them
	for _, n := range names {
		b := batches[n]
		if b.empty() {
			continue
		}
		if _, err := b.apply(ctx, a.tx); err != nil {
			return err
		}
	}
	return writeBacklog(ctx, a.tx, backlog)
}

// commit applies what is left, stores the last transaction's end LSN
// with it, and commits; then the slot may be acknowledged up to there.
func (a *applier) commit(ctx context.Context, done []*txn) error {
	if err := a.flushBatches(ctx); err != nil {
		return err
	}
	last := done[len(done)-1]
	if err := a.s.fault("before commit"); err != nil {
		return err
	}
	if err := a.store(ctx, a.tx, last.endLSN, &last.commitAt); err != nil {
		return err
	}
	if err := a.tx.Commit(ctx); err != nil {
		a.tx = nil
		a.stages.rollback()
		return fmt.Errorf("commit destination transaction: %w", err)
	}
	a.tx = nil
	a.acknowledge(last.endLSN)
	m := a.s.e.metrics
	src := label(a.s.dblink)
	m.txns.WithLabelValues(src).Add(float64(len(done)))
	m.changes.WithLabelValues(src).Add(float64(a.changes))
	m.lag.WithLabelValues(src).Set(time.Since(last.commitAt).Seconds())
	return a.s.fault("after commit")
}

// store records applied_lsn in tx.
func (a *applier) store(ctx context.Context, tx pgx.Tx, lsn pglogrepl.LSN, commitAt *time.Time) error {
	var sync *string
	err := tx.QueryRow(ctx, `UPDATE mimeo.logical_source SET applied_lsn = $2::text::pg_lsn, applied_at = now(),
    last_commit_at = coalesce($3, last_commit_at), status = 'streaming', status_detail = NULL
WHERE dblink = $1 RETURNING sync_lsn::text`, a.s.dblink, lsn.String(), commitAt).Scan(&sync)
	if err != nil {
		return fmt.Errorf("record applied position: %w", err)
	}
	if sync != nil {
		if v, err := pglogrepl.ParseLSN(*sync); err == nil {
			a.syncWant = v
		}
	}
	return nil
}

// acknowledge lets the receiver acknowledge the slot up to lsn, now that
// the destination has committed it.
func (a *applier) acknowledge(lsn pglogrepl.LSN) {
	a.applied = lsn
	a.storedAt = time.Now()
	a.s.acked.Store(uint64(lsn))
	a.s.e.progressed()
}

// advance moves applied_lsn to a keepalive's position when nothing is in
// flight: the source wrote only what this stream does not carry, and the
// slot must not hold that WAL back. It is stored at most once a second,
// at once while a sync point waits.
func (a *applier) advance(ctx context.Context, lsn pglogrepl.LSN) error {
	if lsn <= a.applied {
		// Caught up: say so now and then, so the lag shown stays true.
		if time.Since(a.storedAt) < 5*time.Second {
			return nil
		}
		if _, err := a.s.dst.Exec(ctx, `UPDATE mimeo.logical_source SET applied_at = now() WHERE dblink = $1`, a.s.dblink); err != nil {
			return fmt.Errorf("record applied position: %w", err)
		}
		a.storedAt = time.Now()
		return nil
	}
	if time.Since(a.storedAt) < time.Second && a.syncWant <= a.applied {
		return nil
	}
	tx, err := a.s.dst.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if err := a.store(ctx, tx, lsn, nil); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("record applied position: %w", err)
	}
	a.acknowledge(lsn)
	return nil
}

// failed handles an apply error: one table's error marks that table failed
// (in a transaction of its own) and restarts the stream, which resends
// what was not committed; the other tables go on.
func (a *applier) failed(ctx context.Context, err error) error {
	if perr := a.settle(); perr != nil {
		err = perr // it came first
	}
	a.rollback(ctx)
	var te *tableError
	if !errors.As(err, &te) {
		return err
	}
	a.s.log.Error("logical table failed; it gets no changes until a repull", "dest_table", te.dest, "error", te.err)
	a.s.e.metrics.failed.WithLabelValues(label(a.s.dblink)).Inc()
	detail := te.err.Error()
	if isCode(te.err, "42501") {
		if hint := owner.Hint(context.WithoutCancel(ctx), a.s.dst, te.dest); hint != "" {
			detail += "; " + hint + ", then repull"
		} else {
			detail += "; the agent's role needs SELECT, INSERT, UPDATE and DELETE on " + te.dest + " (grant them, then repull)"
		}
	}
	if !strings.Contains(detail, "p_repull") {
		detail += RepullHint(te.dest)
	}
	if _, xerr := a.s.dst.Exec(context.WithoutCancel(ctx), `UPDATE ONLY mimeo.refresh_config_logical SET state = 'failed', state_detail = $2 WHERE dest_table = $1`,
		te.dest, detail); xerr != nil {
		return fmt.Errorf("%w; and cannot mark it failed: %v", err, xerr)
	}
	a.s.e.progressed()
	delete(a.plans, te.dest)
	return errRestart
}
