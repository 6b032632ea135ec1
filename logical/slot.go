package logical

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/mimeo-dev/mimeo/internal/ident"
)

// DB is what the helpers here need of a connection, pool or transaction.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Names are the source objects of one destination's stream from one
// source database: a permanent slot and a publication of the same name.
type Names struct {
	Slot        string
	Publication string
}

// NamesFor derives the names from a token unique to the destination
// (lowercase letters and digits) and the dblink_mapping id.
func NamesFor(token string, dblink int) Names {
	if len(token) > 16 {
		token = token[:16]
	}
	n := "mimeo_" + token + "_" + strconv.Itoa(dblink)
	return Names{Slot: n, Publication: n}
}

// StreamLockKey is the destination advisory lock the stream of a source
// holds for its lifetime; whoever resets or drops the source's slot takes
// it too.
func StreamLockKey(dblink int) string { return "mimeo.logical:" + strconv.Itoa(dblink) }

// SQLStreamLock takes the stream lock of source $1 for a transaction.
const SQLStreamLock = `SELECT pg_advisory_xact_lock(hashtextextended('mimeo.logical:' || $1::int, 0))`

// HintError is an error with the SQL a DBA runs to fix it.
type HintError struct {
	Err  error
	Hint string
}

func (e *HintError) Error() string { return e.Err.Error() + " (HINT: " + e.Hint + ")" }
func (e *HintError) Unwrap() error { return e.Err }

// EnsurePublication makes sure the publication exists and publishes table
// (a partitioned table as its root). tx is a read-write source transaction;
// role is the replication role, named in the hints.
func EnsurePublication(ctx context.Context, tx pgx.Tx, pub string, table ident.Name, role string) error {
	var exists, member bool
	err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1),
       EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
               WHERE p.pubname = $1 AND pr.prrelid = $2::regclass)`, pub, table.Sanitize()).Scan(&exists, &member)
	if err != nil {
		return fmt.Errorf("read publication %s: %w", pub, err)
	}
	q := ident.Quote(pub)
	if !exists {
		if _, err := tx.Exec(ctx, "SAVEPOINT mimeo_pub"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "CREATE PUBLICATION "+q+" WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = true)")
		if err != nil {
			if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT mimeo_pub"); rerr != nil {
				return rerr
			}
			if isCode(err, "42501") {
				return &HintError{Err: fmt.Errorf("%s may not create publication %s (that needs CREATE on the source database): %w", role, pub, err),
					Hint: fmt.Sprintf("as a superuser on the source run: CREATE PUBLICATION %s WITH (publish_via_partition_root = true); ALTER PUBLICATION %s OWNER TO %s; ALTER PUBLICATION %s ADD TABLE %s; then call the maker (or the repull) again",
						q, q, ident.Quote(role), q, table.Sanitize())}
			}
			return fmt.Errorf("create publication %s: %w", pub, err)
		}
	}
	if err := ensureViaRoot(ctx, tx, pub, table); err != nil {
		return err
	}
	if member {
		return nil
	}
	if _, err := tx.Exec(ctx, "SAVEPOINT mimeo_pub"); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "ALTER PUBLICATION "+q+" ADD TABLE "+table.Sanitize()); err != nil {
		if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT mimeo_pub"); rerr != nil {
			return rerr
		}
		if isCode(err, "42501") {
			return &HintError{Err: fmt.Errorf("%s may not add %s to publication %s (that needs ownership of the table): %w", role, table, pub, err),
				Hint: fmt.Sprintf("adding a table to a publication needs ownership of both; as a superuser on the source run: ALTER PUBLICATION %s ADD TABLE %s; then call the maker (or the repull) again",
					q, table.Sanitize())}
		}
		return fmt.Errorf("add %s to publication %s: %w", table, pub, err)
	}
	return nil
}

// ensureViaRoot makes a publication that carries a partitioned table
// publish its partitions' changes as the table's own: otherwise they would
// arrive under the partitions' names, which no config matches.
func ensureViaRoot(ctx context.Context, tx pgx.Tx, pub string, table ident.Name) error {
	var partitioned, viaRoot bool
	err := tx.QueryRow(ctx, `SELECT c.relkind = 'p', coalesce((SELECT pubviaroot FROM pg_catalog.pg_publication WHERE pubname = $2), true)
FROM pg_catalog.pg_class c WHERE c.oid = $1::regclass`, table.Sanitize(), pub).Scan(&partitioned, &viaRoot)
	if err != nil || !partitioned || viaRoot {
		return err
	}
	q := "ALTER PUBLICATION " + ident.Quote(pub) + " SET (publish_via_partition_root = true)"
	if _, err := tx.Exec(ctx, "SAVEPOINT mimeo_root"); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, q); err != nil {
		if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT mimeo_root"); rerr != nil {
			return rerr
		}
		return &HintError{Err: fmt.Errorf("publication %s must publish partitions as their partitioned table: %w", pub, err),
			Hint: "as a superuser on the source run: " + q + "; then call the maker (or the repull) again"}
	}
	return nil
}

// Partition is one member of a partitioned table's tree on the source.
type Partition struct {
	Name string // schema-qualified, quoted as format's %I does
	File int64  // its relfilenode: a TRUNCATE or a rewrite gives it a new one
	// Created: the partition was made by CREATE TABLE ... PARTITION OF (or
	// attached in the transaction that created it), so every row it holds
	// came through the partitioned table.
	Created bool
	// Filled: its file is not empty (pg_relation_size; no right on the
	// partition is needed to read it).
	Filled bool
}

// Partitions lists the members of a partitioned table's tree, by name
// (nil for a table that is not partitioned). Read in a transaction, the
// files are those of its snapshot.
func Partitions(ctx context.Context, src DB, table ident.Name) ([]Partition, error) {
	// A table created as a partition has its pg_inherits row written by the
	// transaction that made its row type; ATTACH writes it later (and
	// rewrites the pg_class row, so that row's xmin cannot tell).
	rows, err := src.Query(ctx, `SELECT format('%I.%I', n.nspname, c.relname), c.relfilenode::bigint,
       coalesce(i.xmin = ty.xmin, false), pg_catalog.pg_relation_size(c.oid) > 0
FROM pg_catalog.pg_partition_tree($1::regclass) t
JOIN pg_catalog.pg_class c ON c.oid = t.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_inherits i ON i.inhrelid = c.oid
LEFT JOIN pg_catalog.pg_type ty ON ty.oid = c.reltype
WHERE t.relid <> $1::regclass ORDER BY 1`, table.Sanitize())
	if err != nil {
		return nil, fmt.Errorf("read partitions of %s: %w", table, err)
	}
	parts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Partition, error) {
		var p Partition
		err := r.Scan(&p.Name, &p.File, &p.Created, &p.Filled)
		return p, err
	})
	if err != nil {
		return nil, fmt.Errorf("read partitions of %s: %w", table, err)
	}
	if len(parts) == 0 {
		return nil, nil
	}
	return parts, nil
}

// PartitionNames and PartitionFiles are parts' names and files, in order,
// as refresh_config_logical keeps them (NULL for a table not partitioned).
func PartitionNames(parts []Partition) []string {
	if parts == nil {
		return nil
	}
	out := make([]string, len(parts))
	for i, p := range parts {
		out[i] = p.Name
	}
	return out
}

// PartitionFiles: see PartitionNames.
func PartitionFiles(parts []Partition) []int64 {
	if parts == nil {
		return nil
	}
	out := make([]int64, len(parts))
	for i, p := range parts {
		out[i] = p.File
	}
	return out
}

// DropFromPublication takes table out of the publication, if it is in it.
func DropFromPublication(ctx context.Context, tx pgx.Tx, pub string, table ident.Name) error {
	var member bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables
        WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)`, pub, table.Schema, table.Table).Scan(&member); err != nil {
		return err
	}
	if !member {
		return nil
	}
	if _, err := tx.Exec(ctx, "ALTER PUBLICATION "+ident.Quote(pub)+" DROP TABLE "+table.Sanitize()); err != nil {
		if isCode(err, "42501") {
			return &HintError{Err: fmt.Errorf("remove %s from publication %s: %w", table, pub, err),
				Hint: fmt.Sprintf("as a superuser on the source run: ALTER PUBLICATION %s DROP TABLE %s; then call the destroyer again", ident.Quote(pub), table.Sanitize())}
		}
		return fmt.Errorf("remove %s from publication %s: %w", table, pub, err)
	}
	return nil
}

// SlotInfo is what the source says of a slot.
type SlotInfo struct {
	Exists         bool
	Active         bool
	ActivePID      int32
	WALStatus      string
	ConfirmedFlush pglogrepl.LSN
	RetainedBytes  int64
}

// ReadSlot reads a slot's state from pg_replication_slots.
func ReadSlot(ctx context.Context, src DB, slot string) (SlotInfo, error) {
	var (
		s       SlotInfo
		pid     *int32
		status  *string
		flushed *string
		kept    *int64
	)
	err := src.QueryRow(ctx, `SELECT active, active_pid, wal_status, confirmed_flush_lsn::text,
       (pg_current_wal_lsn() - restart_lsn)::bigint
FROM pg_catalog.pg_replication_slots WHERE slot_name = $1`, slot).Scan(&s.Active, &pid, &status, &flushed, &kept)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("read slot %s: %w", slot, err)
	}
	s.Exists = true
	if pid != nil {
		s.ActivePID = *pid
	}
	if status != nil {
		s.WALStatus = *status
	}
	if flushed != nil {
		if s.ConfirmedFlush, err = pglogrepl.ParseLSN(*flushed); err != nil {
			return s, err
		}
	}
	if kept != nil {
		s.RetainedBytes = *kept
	}
	return s, nil
}

// freeSlot waits up to wait for a slot to be let go of (the walsender of
// a killed agent notices its client is gone), then ends that walsender:
// whoever calls this holds the source's stream lock, so no stream of this
// destination uses the slot.
func freeSlot(ctx context.Context, src DB, slot string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		s, err := ReadSlot(ctx, src, slot)
		if err != nil || !s.Exists || !s.Active {
			return err
		}
		if time.Now().After(deadline) {
			if _, err := src.Exec(ctx, `SELECT pg_terminate_backend($1)`, s.ActivePID); err != nil {
				return fmt.Errorf("slot %s is in use by process %d, which cannot be ended: %w", slot, s.ActivePID, err)
			}
			deadline = time.Now().Add(wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// DropSlot drops the slot if it exists, ending a walsender left over by a
// killed agent. The caller holds the stream lock.
func DropSlot(ctx context.Context, src DB, slot string) error {
	if err := freeSlot(ctx, src, slot, 5*time.Second); err != nil {
		return err
	}
	_, err := src.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1`, slot)
	if err != nil {
		return fmt.Errorf("drop slot %s: %w", slot, err)
	}
	return nil
}

// CreateSlot creates the permanent slot on a replication connection and
// returns its consistent point and the source's system identifier.
func CreateSlot(ctx context.Context, repl *pgconn.PgConn, slot string) (pglogrepl.LSN, string, error) {
	sys, err := pglogrepl.IdentifySystem(ctx, repl)
	if err != nil {
		return 0, "", fmt.Errorf("identify source system: %w", err)
	}
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "NOEXPORT_SNAPSHOT"})
	if err != nil {
		return 0, "", slotError("create replication slot "+slot, err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	return lsn, sys.SystemID, err
}

// CopySnapshot is a temporary slot's exported snapshot: an initial copy
// read in it holds exactly the source transactions committed before
// Point. The snapshot lives until Close.
type CopySnapshot struct {
	Point    pglogrepl.LSN
	Snapshot string
	conn     *pgconn.PgConn
}

// NewCopySnapshot creates a temporary slot on a new replication connection
// made from cfg, keeping the connection open for its snapshot. Its creation
// waits for the source transactions in flight to end.
func NewCopySnapshot(ctx context.Context, cfg *pgconn.Config) (*CopySnapshot, error) {
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open replication connection: %w", err)
	}
	name := fmt.Sprintf("mimeo_copy_%d_%d", conn.PID(), time.Now().UnixNano()%1_000_000)
	res, err := pglogrepl.CreateReplicationSlot(ctx, conn, name, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, Mode: pglogrepl.LogicalReplication, SnapshotAction: "EXPORT_SNAPSHOT"})
	if err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, slotError("create temporary slot for the copy", err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, err
	}
	return &CopySnapshot{Point: lsn, Snapshot: res.SnapshotName, conn: conn}, nil
}

// Close ends the snapshot and drops the temporary slot.
func (c *CopySnapshot) Close(ctx context.Context) { _ = c.conn.Close(context.WithoutCancel(ctx)) }

// slotError explains the usual reasons a slot cannot be made.
func slotError(what string, err error) error {
	switch {
	case isCode(err, "42501"):
		return &HintError{Err: fmt.Errorf("%s: %w", what, err),
			Hint: "the replication role needs the REPLICATION attribute: ALTER ROLE <role> REPLICATION;"}
	case isCode(err, "53400"):
		return &HintError{Err: fmt.Errorf("%s: %w", what, err),
			Hint: "raise max_replication_slots (and max_wal_senders) on the source, or drop unused slots"}
	case isCode(err, "55000"):
		return &HintError{Err: fmt.Errorf("%s: %w", what, err), Hint: "set wal_level = logical on the source and restart it"}
	}
	return fmt.Errorf("%s: %w", what, err)
}

// isCode reports whether err wraps a PostgreSQL error with that SQLSTATE.
func isCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}
