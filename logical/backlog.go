package logical

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// backlogRow is a change kept for a table whose copy is running
// (mimeo.logical_backlog), its values by column name.
type backlogRow struct {
	dest      string
	commitLSN string
	commitAt  string
	op        string
	oldKey    *string // JSON object
	newRow    *string // JSON object
	unchanged *string // JSON array
}

// backlogOf converts a change of transaction t for table dest.
func backlogOf(dest string, t *txn, c change) backlogRow {
	row := backlogRow{dest: dest, commitLSN: t.commitLSN.String(), commitAt: t.commitAt.UTC().Format(time.RFC3339Nano), op: string(rune(c.op))}
	if c.old != nil {
		m := map[string]*string{}
		for i, col := range c.rel.columns {
			if col.key && i < len(c.old) {
				m[col.name] = c.old[i]
			}
		}
		row.oldKey = jsonText(m)
	}
	if c.new != nil {
		m := map[string]*string{}
		var unchanged []string
		for i, col := range c.rel.columns {
			if i < len(c.unchanged) && c.unchanged[i] {
				unchanged = append(unchanged, col.name)
				continue
			}
			if i < len(c.new) {
				m[col.name] = c.new[i]
			}
		}
		row.newRow = jsonText(m)
		if len(unchanged) > 0 {
			row.unchanged = jsonText(unchanged)
		}
	}
	return row
}

func jsonText(v any) *string {
	b, _ := json.Marshal(v)
	s := string(b)
	return &s
}

// writeBacklog inserts rows in one statement.
func writeBacklog(ctx context.Context, tx pgx.Tx, rows []backlogRow) error {
	if len(rows) == 0 {
		return nil
	}
	cols := make([][]*string, 7)
	for _, r := range rows {
		for i, v := range []*string{&r.dest, &r.commitLSN, &r.commitAt, &r.op, r.oldKey, r.newRow, r.unchanged} {
			cols[i] = append(cols[i], v)
		}
	}
	_, err := tx.Exec(ctx, `INSERT INTO mimeo.logical_backlog (dest_table, commit_lsn, commit_at, op, old_key, new_row, unchanged)
SELECT d, l::pg_lsn, t::timestamptz, o::"char", k::jsonb, n::jsonb, x::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) AS u(d, l, t, o, k, n, x)`,
		cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6])
	if err != nil {
		return fmt.Errorf("keep changes of tables being copied: %w", err)
	}
	return nil
}

// backlogChunk is how many backlog rows drain reads and applies at once.
const backlogChunk = 5000

// drain applies a copied table's backlog (the changes committed from its
// copy's consistent point on) and makes it ready, in one transaction.
func (a *applier) drain(ctx context.Context, dest string) error {
	if err := a.begin(ctx); err != nil {
		return err
	}
	defer a.rollback(ctx)
	cfgs, err := readTargetByDest(ctx, a.tx, dest)
	if err != nil || len(cfgs) == 0 || cfgs[0].state != "copied" {
		return err
	}
	cfg := cfgs[0]
	rel, err := describeRelation(ctx, a.s.src, cfg.source)
	if err != nil {
		return err
	}
	types, err := relationTypes(ctx, a.s.src, rel)
	if err != nil {
		return err
	}
	p, err := a.buildPlan(ctx, cfg, rel, types)
	if err != nil {
		return a.failed(ctx, err)
	}
	b := newTableBatch(p, backlogChunk)
	var last int64
	applied := 0
	for {
		chunk, err := readBacklog(ctx, a.tx, dest, last, backlogChunk)
		if err != nil {
			return err
		}
		if len(chunk) == 0 {
			break
		}
		for _, r := range chunk {
			last = r.seq
			if r.lsn < cfg.startLSN {
				continue // in the copy already
			}
			b.add(r.change(rel), r.commitAt)
			applied++
		}
		if _, err := b.apply(ctx, a.tx); err != nil {
			return a.failed(ctx, err)
		}
	}
	if _, err := a.tx.Exec(ctx, `DELETE FROM mimeo.logical_backlog WHERE dest_table = $1`, dest); err != nil {
		return fmt.Errorf("clear backlog of %s: %w", dest, err)
	}
	if _, err := a.tx.Exec(ctx, `UPDATE ONLY mimeo.refresh_config_logical SET state = 'ready', state_detail = NULL WHERE dest_table = $1`, dest); err != nil {
		return fmt.Errorf("mark %s ready: %w", dest, err)
	}
	if err := a.tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit backlog of %s: %w", dest, err)
	}
	a.tx = nil
	a.s.e.progressed()
	a.s.log.Info("logical table ready", "dest_table", dest, "backlog_changes", applied)
	return nil
}

// storedChange is a backlog row read back.
type storedChange struct {
	seq       int64
	lsn       pglogrepl.LSN
	commitAt  string
	op        string
	old       map[string]*string
	new       map[string]*string
	unchanged []string
}

// change rebuilds the change in rel's column order.
func (r storedChange) change(rel *relation) change {
	c := change{op: r.op[0], rel: rel}
	if r.old != nil {
		c.old = make([]*string, len(rel.columns))
		for i, col := range rel.columns {
			c.old[i] = r.old[col.name]
		}
	}
	if r.new != nil {
		c.new = make([]*string, len(rel.columns))
		for i, col := range rel.columns {
			c.new[i] = r.new[col.name]
			if slices.Contains(r.unchanged, col.name) {
				if c.unchanged == nil {
					c.unchanged = make([]bool, len(rel.columns))
				}
				c.unchanged[i] = true
			}
		}
	}
	return c
}

func readBacklog(ctx context.Context, tx pgx.Tx, dest string, after int64, limit int) ([]storedChange, error) {
	rows, err := tx.Query(ctx, `SELECT seq, commit_lsn::text, commit_at::text, op::text, old_key, new_row, unchanged
FROM mimeo.logical_backlog WHERE dest_table = $1 AND seq > $2 ORDER BY seq LIMIT $3`, dest, after, limit)
	if err != nil {
		return nil, fmt.Errorf("read backlog of %s: %w", dest, err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (storedChange, error) {
		var (
			c   storedChange
			lsn string
		)
		if err := r.Scan(&c.seq, &lsn, &c.commitAt, &c.op, &c.old, &c.new, &c.unchanged); err != nil {
			return c, err
		}
		var err error
		c.lsn, err = pglogrepl.ParseLSN(lsn)
		return c, err
	})
}

// readTargetByDest reads and locks one table's config.
func readTargetByDest(ctx context.Context, tx pgx.Tx, dest string) ([]*tableConfig, error) {
	var (
		src    string
		dblink int
	)
	err := tx.QueryRow(ctx, `SELECT source_table, dblink FROM ONLY mimeo.refresh_config_logical WHERE dest_table = $1`, dest).Scan(&src, &dblink)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	name, err := ident.Parse(src)
	if err != nil {
		return nil, err
	}
	all, err := readTargets(ctx, tx, dblink, name)
	if err != nil {
		return nil, err
	}
	for _, c := range all {
		if c.destText == dest {
			return []*tableConfig{c}, nil
		}
	}
	return nil, nil
}

// idleDuties run between transactions, at most every 250 ms: notice a
// sync point waiting, drain copied tables, stop when no table is left,
// and every 10 s measure the slot.
func (a *applier) idleDuties(ctx context.Context) error {
	if time.Since(a.lastIdle) < 250*time.Millisecond {
		return nil
	}
	a.lastIdle = time.Now()
	var (
		sync   *string
		tables int
		copied []string
	)
	err := a.s.dst.QueryRow(ctx, `SELECT s.sync_lsn::text,
       (SELECT count(*) FROM ONLY mimeo.refresh_config_logical c WHERE c.dblink = s.dblink),
       array(SELECT c.dest_table FROM ONLY mimeo.refresh_config_logical c WHERE c.dblink = s.dblink AND c.state = 'copied' ORDER BY 1)
FROM mimeo.logical_source s WHERE s.dblink = $1`, a.s.dblink).Scan(&sync, &tables, &copied)
	if errors.Is(err, pgx.ErrNoRows) {
		return errNoTables
	}
	if err != nil {
		return fmt.Errorf("read stream state: %w", err)
	}
	if tables == 0 {
		return errNoTables
	}
	if time.Since(a.storedAt) >= 5*time.Second {
		a.s.replyQ.Store(true) // a keepalive tells whether the stream is current
	}
	if sync != nil {
		if v, err := pglogrepl.ParseLSN(*sync); err == nil && v > a.applied {
			a.syncWant = v
			a.s.replyQ.Store(true) // the walsender answers with its position
		}
	}
	for _, dest := range copied {
		if err := a.drain(ctx, dest); err != nil {
			return err
		}
	}
	if time.Since(a.lastCheck) >= a.s.e.cfg.CheckInterval {
		a.lastCheck = time.Now()
		a.measure(ctx)
	}
	return nil
}

// measure records the WAL the slot retains, warning above the threshold.
func (a *applier) measure(ctx context.Context) {
	slot, err := ReadSlot(ctx, a.s.src, a.s.names.Slot)
	if err != nil || !slot.Exists {
		return
	}
	a.s.e.metrics.retained.WithLabelValues(label(a.s.dblink)).Set(float64(slot.RetainedBytes))
	a.s.e.metrics.resync.WithLabelValues(label(a.s.dblink)).Set(0)
	if _, err := a.s.dst.Exec(ctx, `UPDATE mimeo.logical_source SET retained_bytes = $2, checked_at = now() WHERE dblink = $1`,
		a.s.dblink, slot.RetainedBytes); err != nil {
		a.s.log.Warn("cannot record the slot's retained WAL", "error", err)
	}
	a.checkPartitions(ctx)
	a.failAbandonedCopies(ctx)
	over := slot.RetainedBytes > a.s.e.cfg.WALWarnBytes
	if over && !a.warned {
		a.s.log.Warn("the slot retains more WAL than MIMEO_LOGICAL_WAL_WARNING on the source", "slot", a.s.names.Slot,
			"retained_bytes", slot.RetainedBytes, "warning_bytes", a.s.e.cfg.WALWarnBytes, "wal_status", slot.WALStatus)
	}
	a.warned = over
}

// checkPartitions compares each partitioned table's partitions with those
// of its copy. ATTACH, DETACH and DROP move rows without changes the stream
// sees, and fail the table; a partition created as one is recorded (its
// rows stream as the table's). A partition whose file changed was
// truncated, which pgoutput does not send for a partition published
// through its root, or rewritten: the table is compared with the source
// (a validate request), which fails it when the copy differs.
func (a *applier) checkPartitions(ctx context.Context) {
	rows, err := a.s.dst.Query(ctx, `SELECT dest_table, source_table, partitions, partition_files FROM ONLY mimeo.refresh_config_logical
WHERE dblink = $1 AND partitions IS NOT NULL AND state IN ('ready', 'copied')`, a.s.dblink)
	if err != nil {
		return
	}
	type tbl struct {
		dest, src string
		parts     []string
		files     []int64
	}
	tables, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (tbl, error) {
		var t tbl
		err := r.Scan(&t.dest, &t.src, &t.parts, &t.files)
		return t, err
	})
	if err != nil {
		return
	}
	for _, t := range tables {
		name, err := ident.Parse(t.src)
		if err != nil {
			continue
		}
		now, err := Partitions(ctx, a.s.src, name)
		if err != nil {
			continue
		}
		c := comparePartitions(t.parts, t.files, now)
		if len(c.attached) > 0 || len(c.lost) > 0 {
			why := fmt.Sprintf("the partitions of %s changed on the source (attached: %v, detached or dropped: %v); ATTACH, DETACH and DROP move rows without changes the stream sees",
				t.src, c.attached, c.lost)
			a.s.log.Error("logical table failed; it gets no changes until a repull", "dest_table", t.dest, "error", why)
			if err := MarkFailed(ctx, a.s.dst, t.dest, why+RepullHint(t.dest)); err != nil {
				a.s.log.Warn("cannot mark the table failed", "error", err)
			}
			a.s.e.progressed()
			continue
		}
		if len(c.created) == 0 && len(c.rewritten) == 0 && t.files != nil {
			continue
		}
		if err := a.recordPartitions(ctx, t.dest, t.parts, now, c); err != nil {
			a.s.log.Warn("cannot record the table's partitions", "dest_table", t.dest, "error", err)
			continue
		}
		if len(c.created) > 0 {
			a.s.log.Info("new partitions of a logical table's source; their rows stream as the table's", "dest_table", t.dest, "partitions", c.created)
		}
		if len(c.rewritten) > 0 || len(c.filled) > 0 {
			a.s.log.Warn("partitions of a logical table's source were truncated or rewritten, or created holding rows; comparing the table with the source",
				"dest_table", t.dest, "rewritten", c.rewritten, "created_with_rows", c.filled)
		}
	}
}

// partitionChange is how a table's partitions differ from its copy's.
type partitionChange struct {
	created, attached, lost, rewritten []string
	// filled: created partitions already holding rows, which may have been
	// written before the partition was attached in its creating transaction
	// (pg_partman's way), so not through the table.
	filled []string
}

// comparePartitions compares the partitions (and their files, if known) of
// a copy with the source's now.
func comparePartitions(parts []string, files []int64, now []Partition) partitionChange {
	var c partitionChange
	for _, p := range now {
		i := slices.Index(parts, p.Name)
		switch {
		case i < 0 && p.Created:
			c.created = append(c.created, p.Name)
			if p.Filled {
				c.filled = append(c.filled, p.Name)
			}
		case i < 0:
			c.attached = append(c.attached, p.Name)
		case len(files) == len(parts) && files[i] != p.File:
			c.rewritten = append(c.rewritten, p.Name)
		}
	}
	for _, p := range parts {
		if !slices.ContainsFunc(now, func(n Partition) bool { return n.Name == p }) {
			c.lost = append(c.lost, p)
		}
	}
	return c
}

// recordPartitions keeps the source's partitions now as the table's and,
// for partitions rewritten or created holding rows, queues a comparison of
// the table with the source, in one transaction: a crash before it commits
// finds the change again.
func (a *applier) recordPartitions(ctx context.Context, dest string, was []string, now []Partition, c partitionChange) error {
	return pgx.BeginFunc(ctx, a.s.dst, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE ONLY mimeo.refresh_config_logical SET partitions = $2, partition_files = $3
WHERE dest_table = $1 AND partitions = $4 AND state IN ('ready', 'copied')`, dest, PartitionNames(now), PartitionFiles(now), was)
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		var reasons []string
		if len(c.rewritten) > 0 {
			reasons = append(reasons, fmt.Sprintf("partitions %v of the source were truncated or rewritten since the copy (pgoutput does not send a TRUNCATE of one partition)",
				c.rewritten))
		}
		if len(c.filled) > 0 {
			reasons = append(reasons, fmt.Sprintf("new partitions %v were not empty when first seen (rows written into a table before its ATTACH, in the transaction that created it, are not in the stream; rows written through the table since are)",
				c.filled))
		}
		if len(reasons) == 0 {
			return nil
		}
		_, err = tx.Exec(ctx, `SELECT mimeo.enqueue('validate', $1, jsonb_build_object('repair', false, 'reason', $2::text))`,
			dest, strings.Join(reasons, "; "))
		return err
	})
}

// failAbandonedCopies fails a table whose maker or repull request ended
// (given up on after its agent died, say) while its copy was running: its
// changes would otherwise pile up in the backlog for ever.
func (a *applier) failAbandonedCopies(ctx context.Context) {
	rows, err := a.s.dst.Query(ctx, `WITH gone AS (
    UPDATE ONLY mimeo.refresh_config_logical c SET state = 'failed',
        state_detail = 'its ' || c.state_detail || ' ended before the copy did; run SELECT mimeo.refresh_logical('
            || quote_literal(c.dest_table) || ', p_repull => true), or the destroyer'
    WHERE c.dblink = $1 AND c.state = 'copying' AND c.state_detail ~ '^(maker|repull) request [0-9]+$'
      AND NOT EXISTS (SELECT 1 FROM mimeo.request r
                      WHERE r.id = substring(c.state_detail FROM '[0-9]+$')::bigint AND r.status IN ('queued', 'running'))
    RETURNING c.dest_table),
del AS (DELETE FROM mimeo.logical_backlog b USING gone WHERE b.dest_table = gone.dest_table)
SELECT dest_table FROM gone`, a.s.dblink)
	if err != nil {
		a.s.log.Warn("cannot check for abandoned copies", "error", err)
		return
	}
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return
	}
	for _, t := range tables {
		a.s.log.Error("logical table failed: the request copying it ended before the copy did", "dest_table", t)
	}
}
