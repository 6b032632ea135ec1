package logical

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sync/errgroup"
)

// stream is one connection to one source's slot.
type stream struct {
	e      *Engine
	dblink int
	log    hclog.Logger

	names  Names
	sysID  *string
	dst    *pgx.Conn // holds the stream lock; every destination write of the stream
	src    *pgx.Conn // catalog reads and slot checks
	repl   *pgconn.PgConn
	start  pglogrepl.LSN // applied_lsn when the stream started
	acked  atomic.Uint64 // committed on the destination: what the slot may be acknowledged to
	replyQ atomic.Bool   // ask the walsender for a keepalive (a sync point waits)

	mayStream bool // ask for streaming, where the source has it
	streaming bool // transactions in progress are streamed (protocol 2)

	// The receiver's (and, once it has stopped, run's).
	received pglogrepl.LSN // the end of what the walsender sent
	sentAck  pglogrepl.LSN // the last flush position sent
}

// run takes the stream lock, checks the slot, and streams until an error,
// ctx's end, or the source has no tables left.
func (s *stream) run(ctx context.Context) error {
	dcfg := s.e.dst.Config().ConnConfig.Copy()
	dcfg.RuntimeParams["application_name"] = "mimeo-agent logical"
	// A batch joins a few keys against a large table: probing its key
	// index beats hashing the table, whatever the estimates say; and its
	// keys are distinct, so caching probes (memoize) only costs.
	dcfg.RuntimeParams["enable_hashjoin"] = "off"
	dcfg.RuntimeParams["enable_mergejoin"] = "off"
	dcfg.RuntimeParams["enable_memoize"] = "off"
	dst, err := pgx.ConnectConfig(ctx, dcfg)
	if err != nil {
		return fmt.Errorf("connect to destination: %w", err)
	}
	s.dst = dst
	defer func() { _ = dst.Close(context.WithoutCancel(ctx)) }()
	var locked bool
	if err := dst.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended('mimeo.logical:' || $1::int, 0))`, s.dblink).Scan(&locked); err != nil {
		return fmt.Errorf("take stream lock: %w", err)
	}
	if !locked {
		return errBusy
	}
	var applied *string
	var status string
	err = dst.QueryRow(ctx, `SELECT slot_name, publication, system_identifier, applied_lsn::text, status
FROM mimeo.logical_source WHERE dblink = $1`, s.dblink).Scan(&s.names.Slot, &s.names.Publication, &s.sysID, &applied, &status)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && applied == nil) {
		return errNoTables
	}
	if err != nil {
		return fmt.Errorf("read mimeo.logical_source: %w", err)
	}
	if status == "needs_resync" {
		return errResync
	}
	if s.start, err = pglogrepl.ParseLSN(*applied); err != nil {
		return err
	}
	s.acked.Store(uint64(s.start))

	// Both source connections at once: each costs a round trip or more
	// (TLS, SCRAM), and the stream starts only after both.
	var g errgroup.Group
	g.Go(func() error {
		var err error
		if s.src, err = s.e.sources.Connect(ctx, s.dblink); err != nil {
			return fmt.Errorf("connect to source %d: %w", s.dblink, err)
		}
		return nil
	})
	g.Go(func() error {
		rcfg, err := s.e.sources.ReplicationConfig(ctx, s.dblink)
		if err != nil {
			return err
		}
		quiet(rcfg) // the walsender's messages read in gulps, not one wake-up each
		if s.repl, err = pgconn.ConnectConfig(ctx, rcfg); err != nil {
			return fmt.Errorf("open replication connection to source %d: %w", s.dblink, err)
		}
		return nil
	})
	err = g.Wait()
	if s.src != nil {
		defer func() { _ = s.src.Close(context.WithoutCancel(ctx)) }()
	}
	if s.repl != nil {
		defer func() { _ = s.repl.Close(context.WithoutCancel(ctx)) }()
	}
	if err != nil {
		return err
	}
	if err := s.guard(ctx); err != nil {
		return err
	}
	args := []string{"proto_version '1'"}
	if s.mayStream && canStream(s.repl.ParameterStatus("server_version")) {
		if args, err = startStreaming(ctx, s.repl, s.e.cfg.MemoryBudget/4); err != nil {
			return err
		}
		s.streaming = true
	}
	err = pglogrepl.StartReplication(ctx, s.repl, s.names.Slot, s.start, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: append(args, "publication_names "+quoteLit(s.names.Publication)),
	})
	if err != nil {
		if lost(err) {
			return s.needsResync(ctx, fmt.Sprintf("slot %s can no longer stream: %v", s.names.Slot, err))
		}
		return fmt.Errorf("start replication on slot %s: %w", s.names.Slot, err)
	}
	s.log.Info("logical stream started", "slot", s.names.Slot, "from", s.start.String(), "streaming", s.streaming)
	s.setStatus(ctx, "streaming", "")

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	items := newHandover()
	recvDone := make(chan error, 1)
	go func() {
		err := s.receive(ctx, items)
		cancel(err)
		recvDone <- err
	}()
	a := newApplier(s)
	err = a.run(ctx, items)
	cancel(err)
	rerr := <-recvDone
	s.lastStatus(ctx)
	if err == nil || errors.Is(err, context.Canceled) {
		if rerr != nil && !errors.Is(rerr, context.Canceled) {
			err = rerr
		}
	}
	if err != nil && lost(err) {
		return s.needsResync(context.WithoutCancel(ctx), fmt.Sprintf("slot %s can no longer stream: %v", s.names.Slot, err))
	}
	return err
}

// lastStatus acknowledges, once receiving has stopped, what the
// destination committed since the last acknowledgement: without it a
// stopped agent leaves the slot's restart point behind, and the next
// walsender decodes that WAL again.
func (s *stream) lastStatus(ctx context.Context) {
	if s.repl.IsClosed() || pglogrepl.LSN(s.acked.Load()) <= s.sentAck {
		return
	}
	if err := s.sendStatus(context.WithoutCancel(ctx), false, time.Second); err != nil {
		s.log.Debug("cannot acknowledge the slot on stopping", "error", err)
	}
}

// guard refuses to stream from a slot that cannot continue exactly where
// the destination stopped: missing, invalidated, moved past applied_lsn,
// or on another cluster than the one it was made on.
func (s *stream) guard(ctx context.Context) error {
	sys, err := pglogrepl.IdentifySystem(ctx, s.repl)
	if err != nil {
		return fmt.Errorf("identify source system: %w", err)
	}
	if s.sysID != nil && *s.sysID != "" && *s.sysID != sys.SystemID {
		return s.needsResync(ctx, fmt.Sprintf("the source's system identifier is %s, not %s as when slot %s was made: it is another cluster (restored or failed over), whose slot cannot continue the stream",
			sys.SystemID, *s.sysID, s.names.Slot))
	}
	slot, err := ReadSlot(ctx, s.src, s.names.Slot)
	if err != nil {
		return err
	}
	switch {
	case !slot.Exists:
		return s.needsResync(ctx, fmt.Sprintf("slot %s is missing on the source (dropped?); changes since %s are lost to it", s.names.Slot, s.start))
	case slot.WALStatus == "lost":
		return s.needsResync(ctx, fmt.Sprintf("slot %s was invalidated (wal_status lost: the WAL it needed was removed, see max_slot_wal_keep_size)", s.names.Slot))
	case slot.ConfirmedFlush > s.start:
		return s.needsResync(ctx, fmt.Sprintf("slot %s was advanced to %s, past %s which the destination applied: the changes between are lost to it",
			s.names.Slot, slot.ConfirmedFlush, s.start))
	}
	if slot.Active {
		// A walsender left over by a killed agent: this destination's
		// stream lock is ours, so nobody else of ours is using it.
		if err := freeSlot(ctx, s.src, s.names.Slot, 10*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// lost reports whether the server says the slot cannot stream any more.
func lost(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	return strings.Contains(pgErr.Message, "can no longer get changes from replication slot") ||
		strings.Contains(pgErr.Message, "has already been removed") ||
		(pgErr.Code == "42704" && strings.Contains(pgErr.Message, "replication slot"))
}

// needsResync marks the source and its tables as needing a repull and
// returns errResync.
func (s *stream) needsResync(ctx context.Context, why string) error {
	s.log.Error("logical source needs a resync: its tables get no changes until refresh_logical(p_repull => true)", "reason", why)
	s.e.metrics.resync.WithLabelValues(label(s.dblink)).Set(1)
	err := markResync(ctx, s.dst, s.dblink, why)
	if err != nil {
		return fmt.Errorf("%s; and cannot record it: %w", why, err)
	}
	s.e.progressed()
	return errResync
}

// markResync records on the destination that the source's slot cannot
// continue: every table not failed already waits for a repull.
func markResync(ctx context.Context, dst DB, dblink int, why string) error {
	_, err := dst.Exec(ctx, `WITH s AS (
    UPDATE mimeo.logical_source SET status = 'needs_resync', status_detail = $2 || '; repull each of its tables', checked_at = now()
    WHERE dblink = $1 RETURNING dblink)
UPDATE ONLY mimeo.refresh_config_logical c SET state = 'needs_resync',
    state_detail = $2 || '; run SELECT mimeo.refresh_logical(' || quote_literal(c.dest_table) || ', p_repull => true)'
FROM s WHERE c.dblink = s.dblink AND c.state <> 'failed'`, dblink, why)
	return err
}

// setStatus records the stream's status (errors are only logged).
func (s *stream) setStatus(ctx context.Context, status, detail string) {
	if _, err := s.e.dst.Exec(ctx, `UPDATE mimeo.logical_source SET status = $2, status_detail = nullif($3, '') WHERE dblink = $1 AND status <> 'needs_resync'`,
		s.dblink, status, detail); err != nil {
		s.log.Warn("cannot record the stream's status", "error", err)
	}
}

// fault runs the test hook at point.
func (s *stream) fault(point string) error {
	if s.e.cfg.Faults == nil {
		return nil
	}
	return s.e.cfg.Faults(point)
}

func quoteLit(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
