package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/logical"
)

// The logical type's requests. The stream itself is the logical package's
// Engine; these make, resync and remove tables, and meet the stream through
// the destination: a table's state in mimeo.refresh_config_logical, changed
// under the row lock the stream's transactions hold.

type logicalMakerArgs struct {
	makerArgs
	PkField []string `json:"pk_field"`
	PkType  []string `json:"pk_type"`
	Logdel  bool     `json:"logdel"`
}

type refreshLogicalArgs struct {
	Repull bool `json:"repull"`
}

// logicalConfig is a logical table's config.
type logicalConfig struct {
	Dblink    int
	Source    ident.Name
	Filter    []string
	Condition string
	Indexes   bool
	Keys      []string
	KeyTypes  []string
	Logdel    bool
	State     string
	Detail    string
}

func loadLogicalConfig(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, dest string) (*logicalConfig, error) {
	var c logicalConfig
	var src string
	var detail *string
	err := db.QueryRow(ctx, `SELECT dblink, source_table, coalesce(filter, '{}'), coalesce(condition, ''), create_indexes,
       pk_field, pk_type, logdel, state, state_detail
FROM ONLY mimeo.refresh_config_logical WHERE dest_table = $1`, dest).Scan(&c.Dblink, &src, &c.Filter, &c.Condition, &c.Indexes,
		&c.Keys, &c.KeyTypes, &c.Logdel, &c.State, &detail)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%s: %w", dest, ErrNotConfigured)
	}
	if err != nil {
		return nil, fmt.Errorf("read config of %s: %w", dest, err)
	}
	c.Detail = deref(detail)
	if c.Source, err = ident.Parse(src); err != nil {
		return nil, err
	}
	return &c, nil
}

// logicalKey picks the key: the replica identity, which is what pgoutput
// sends for the old row of an UPDATE or DELETE. p_pk_field may name it (or
// any NOT NULL unique columns of a REPLICA IDENTITY FULL table).
func logicalKey(ctx context.Context, src *pgxpool.Conn, st *sourceTable, field, types []string) ([]string, []string, error) {
	ri, full, err := logical.ReplicaIdentity(ctx, src, st.Name)
	if err != nil {
		return nil, nil, err
	}
	if full {
		return updaterKey(st, field, types)
	}
	if len(field) > 0 && !slices.Equal(field, ri) {
		return nil, nil, fmt.Errorf("p_pk_field (%s) must be the replica identity of %s (%s): pgoutput identifies updated and deleted rows by it",
			strings.Join(field, ", "), st.Name, strings.Join(ri, ", "))
	}
	var typs []string
	for _, k := range ri {
		i := indexOfColumn(st.Columns, k)
		if i < 0 {
			return nil, nil, fmt.Errorf("p_filter leaves out key column %s of %s; the key (replica identity) must be copied", ident.Display(k), st.Name)
		}
		typs = append(typs, st.Columns[i].Type)
	}
	if len(types) > 0 {
		typs = types
	}
	return ri, typs, nil
}

// logicalNames returns the slot and publication names of a source,
// recording the source's row on first use. The names carry a random token:
// slots are per source cluster, and destinations made from one template
// database share their mimeo.instance.
func logicalNames(ctx context.Context, dst *pgxpool.Conn, dblink int) (logical.Names, error) {
	token := make([]byte, 6)
	_, _ = rand.Read(token)
	n := logical.NamesFor(hex.EncodeToString(token), dblink)
	var names logical.Names
	err := dst.QueryRow(ctx, `INSERT INTO mimeo.logical_source (dblink, slot_name, publication) VALUES ($1, $2, $3)
ON CONFLICT (dblink) DO UPDATE SET dblink = EXCLUDED.dblink RETURNING slot_name, publication`, dblink, n.Slot, n.Publication).Scan(&names.Slot, &names.Publication)
	if err != nil {
		return names, fmt.Errorf("record logical source %d: %w", dblink, err)
	}
	return names, nil
}

// ensurePublication adds the table to the source's publication.
func ensurePublication(ctx context.Context, src *pgxpool.Conn, names logical.Names, table ident.Name) error {
	tx, err := beginWrite(ctx, src)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	var role string
	if err := tx.QueryRow(ctx, `SELECT current_user`).Scan(&role); err != nil {
		return err
	}
	if err := logical.EnsurePublication(ctx, tx, names.Publication, table, role); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// resetSlot (re)creates the source's permanent slot when nothing streams
// from it that must go on: the first table of a source, a source whose
// slot needs a resync, or one left over. The stream lock keeps the stream
// away meanwhile; applied_lsn starts at the new slot's consistent point.
// except is the table being made or repulled.
func (a *Agent) resetSlot(ctx context.Context, r *run, src *pgxpool.Conn, dblink int, names logical.Names, maker bool) error {
	need := func(q interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}) (bool, error) {
		var need bool
		err := q.QueryRow(ctx, `SELECT s.applied_lsn IS NULL OR s.status = 'needs_resync'
    OR ($3 AND NOT EXISTS (SELECT 1 FROM ONLY mimeo.refresh_config_logical c WHERE c.dblink = s.dblink AND c.dest_table <> $2))
FROM mimeo.logical_source s WHERE s.dblink = $1`, dblink, r.req.DestTable, maker).Scan(&need)
		return need, err
	}
	if ok, err := need(r.dst); err != nil || !ok {
		return err
	}
	return r.step(ctx, "Create replication slot", func() (string, error) {
		rcfg, err := a.sources.replicationConfig(ctx, r.dst, dblink)
		if err != nil {
			return "", err
		}
		var point pglogrepl.LSN
		err = withTx(ctx, r.dst, func(tx pgx.Tx) error {
			// The stream of this source stops when it has no table left or
			// needs a resync; wait for it to let go.
			if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '60s'`); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, logical.SQLStreamLock, dblink); err != nil {
				return fmt.Errorf("wait for the stream of source %d to stop: %w", dblink, err)
			}
			if ok, err := need(tx); err != nil || !ok {
				return err
			}
			if err := logical.DropSlot(ctx, src, names.Slot); err != nil {
				return err
			}
			repl, err := pgconnConnect(ctx, rcfg)
			if err != nil {
				return err
			}
			defer func() { _ = repl.Close(context.WithoutCancel(ctx)) }()
			var sys string
			if point, sys, err = logical.CreateSlot(ctx, repl, names.Slot); err != nil {
				return err
			}
			_, err = tx.Exec(ctx, `UPDATE mimeo.logical_source SET applied_lsn = $2::text::pg_lsn, applied_at = now(), system_identifier = $3,
    status = 'new', status_detail = NULL, sync_lsn = NULL WHERE dblink = $1`, dblink, point.String(), sys)
			return err
		})
		return fmt.Sprintf("created slot %s at %s", names.Slot, point), err
	})
}
