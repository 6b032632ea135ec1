package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/mimeo-dev/mimeo/internal/ident"
	"github.com/mimeo-dev/mimeo/queue"
)

const sqlSourceMapping = `SELECT data_source, username, coalesce(pwd, '') FROM mimeo.dblink_mapping WHERE data_source_id = $1`

// sources pools connections per source (dblink_mapping row). A pool is
// rebuilt when its mapping row changes; idle connections close themselves
// after Config.SourceIdleTimeout.
type sources struct {
	cfg Config
	log hclog.Logger

	mu    sync.Mutex
	pools map[int]*sourcePool
}

type sourcePool struct {
	key  string // the mapping row the pool was built from
	desc string // host/db/user, never the password
	pool *pgxpool.Pool
}

func newSources(cfg Config, log hclog.Logger) *sources {
	return &sources{cfg: cfg, log: log, pools: map[int]*sourcePool{}}
}

// acquire returns a connection to source id, read from dest's
// dblink_mapping, and a description of it for messages.
func (s *sources) acquire(ctx context.Context, dest queue.DB, id int) (*pgxpool.Conn, string, error) {
	var dataSource, user, pwd string
	err := dest.QueryRow(ctx, sqlSourceMapping, id).Scan(&dataSource, &user, &pwd)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, "", fmt.Errorf("source %d: %w", id, ErrUnknownSource)
	}
	if err != nil {
		return nil, "", fmt.Errorf("read source %d from mimeo.dblink_mapping: %w", id, err)
	}
	sp, err := s.pool(id, dataSource+"\x00"+user+"\x00"+pwd, dataSource, user, pwd)
	if err != nil {
		return nil, "", err
	}
	conn, err := sp.pool.Acquire(ctx)
	if err != nil {
		return nil, sp.desc, fmt.Errorf("connect to source %d (%s): %w", id, sp.desc, ServerError(err))
	}
	return conn, sp.desc, nil
}

func (s *sources) pool(id int, key, dataSource, user, pwd string) (*sourcePool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sp, ok := s.pools[id]; ok {
		if sp.key == key {
			return sp, nil
		}
		// The mapping changed (a new password, say). Close the old pool
		// once its running copies are done, without holding s.mu meanwhile.
		go sp.pool.Close()
		delete(s.pools, id)
	}
	cfg, err := pgxpool.ParseConfig(dataSource)
	if err != nil {
		return nil, fmt.Errorf("source %d: data_source is not a valid connection string: %w", id, err)
	}
	cfg.ConnConfig.User = user
	if pwd != "" {
		cfg.ConnConfig.Password = pwd
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = s.cfg.ConnectTimeout
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "mimeo-agent"
	// Reading is all snap and table need; a read-only session makes sure
	// nothing configured (a condition, say) can write to the source.
	cfg.ConnConfig.RuntimeParams["default_transaction_read_only"] = "on"
	cfg.MinConns = 0
	cfg.MaxConns = int32(2*s.cfg.Workers + 1) // a dml maker holds two (trigger DDL and the copy)
	cfg.MaxConnIdleTime = s.cfg.SourceIdleTimeout
	cfg.HealthCheckPeriod = min(s.cfg.SourceIdleTimeout, cfg.HealthCheckPeriod)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, fmt.Errorf("source %d: %w", id, err)
	}
	sp := &sourcePool{
		key:  key,
		desc: fmt.Sprintf("host=%s port=%d dbname=%s user=%s", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database, user),
		pool: pool,
	}
	s.pools[id] = sp
	return sp, nil
}

// close closes every source pool.
func (s *sources) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, sp := range s.pools {
		sp.pool.Close()
		delete(s.pools, id)
	}
}

// sourceSpec is what a run reads: a dblink_mapping id and a table, with
// its filter and condition.
type sourceSpec struct {
	Dblink    int
	Table     string // schema-qualified, as mimeo stores it
	Filter    []string
	Condition string
	Indexes   bool // also read the table's indexes
}

// openSource connects to a run's source and describes its table; the
// caller releases the connection.
func (a *Agent) openSource(ctx context.Context, r *run, s sourceSpec) (*pgxpool.Conn, *sourceTable, error) {
	name, err := ident.Parse(s.Table)
	if err != nil {
		return nil, nil, fmt.Errorf("source table: %w", err)
	}
	src, desc, err := a.sources.acquire(ctx, r.dst, s.Dblink)
	if err != nil {
		return nil, nil, err
	}
	r.note(ctx, "Connect to source", "connected to source "+desc, false)
	st, err := describeSource(ctx, src, name, s.Filter, s.Condition, s.Indexes)
	if err != nil {
		src.Release()
		return nil, nil, err
	}
	return src, st, nil
}

// mapping reads source id's dblink_mapping row into a connection config.
func (s *sources) mapping(ctx context.Context, dest queue.DB, id int) (*pgconn.Config, error) {
	var dataSource, user, pwd string
	err := dest.QueryRow(ctx, sqlSourceMapping, id).Scan(&dataSource, &user, &pwd)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("source %d: %w", id, ErrUnknownSource)
	}
	if err != nil {
		return nil, fmt.Errorf("read source %d from mimeo.dblink_mapping: %w", id, err)
	}
	cfg, err := pgconn.ParseConfig(dataSource)
	if err != nil {
		return nil, fmt.Errorf("source %d: data_source is not a valid connection string: %w", id, err)
	}
	cfg.User = user
	if pwd != "" {
		cfg.Password = pwd
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = s.cfg.ConnectTimeout
	}
	cfg.RuntimeParams["application_name"] = "mimeo-agent logical"
	return cfg, nil
}

// replicationConfig is a replication connection's config for source id.
func (s *sources) replicationConfig(ctx context.Context, dest queue.DB, id int) (*pgconn.Config, error) {
	cfg, err := s.mapping(ctx, dest, id)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams["replication"] = "database"
	return cfg, nil
}

// pgconnConnect opens a replication connection.
func pgconnConnect(ctx context.Context, cfg *pgconn.Config) (*pgconn.PgConn, error) {
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open replication connection to %s/%s: %w", cfg.Host, cfg.Database, ServerError(err))
	}
	return conn, nil
}

// logicalSources gives the logical engine its source connections.
type logicalSources struct{ a *Agent }

// Connect opens a session on source dblink.
func (l logicalSources) Connect(ctx context.Context, dblink int) (*pgx.Conn, error) {
	cfg, err := l.a.sources.mapping(ctx, l.a.pool, dblink)
	if err != nil {
		return nil, err
	}
	ccfg, err := pgx.ParseConfig("")
	if err != nil {
		return nil, err
	}
	ccfg.Config = *cfg
	conn, err := pgx.ConnectConfig(ctx, ccfg)
	if err != nil {
		return nil, ServerError(err)
	}
	return conn, nil
}

// ReplicationConfig is the config of a replication connection to dblink.
func (l logicalSources) ReplicationConfig(ctx context.Context, dblink int) (*pgconn.Config, error) {
	return l.a.sources.replicationConfig(ctx, l.a.pool, dblink)
}
