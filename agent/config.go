package agent

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/sethvargo/go-envconfig"
)

// Config is the agent's configuration, read from MIMEO_* environment
// variables; the CLI's flags override it.
type Config struct {
	// DatabaseURL is the destination database, where the mimeo schema lives.
	DatabaseURL string `env:"MIMEO_DATABASE_URL"`
	// Workers is how many requests run at once (different tables in parallel).
	Workers int `env:"MIMEO_WORKERS, default=4"`
	// PollInterval is how often the queue is polled besides LISTEN/NOTIFY.
	PollInterval time.Duration `env:"MIMEO_POLL_INTERVAL, default=5s"`
	// HeartbeatInterval is how often the agent row's last_seen is updated.
	HeartbeatInterval time.Duration `env:"MIMEO_HEARTBEAT_INTERVAL, default=10s"`
	// AgentTimeout is how old a heartbeat may be before the agent counts as
	// dead and its running requests are recovered.
	AgentTimeout time.Duration `env:"MIMEO_AGENT_TIMEOUT, default=1m"`
	// MaxAttempts bounds how often a request orphaned by a dead agent is
	// retried before it is failed.
	MaxAttempts int `env:"MIMEO_MAX_ATTEMPTS, default=3"`
	// ShutdownTimeout is how long running jobs may finish after SIGTERM
	// before they are cancelled (and rolled back).
	ShutdownTimeout time.Duration `env:"MIMEO_SHUTDOWN_TIMEOUT, default=30s"`
	// SourceIdleTimeout closes pooled source connections unused this long.
	SourceIdleTimeout time.Duration `env:"MIMEO_SOURCE_IDLE_TIMEOUT, default=1m"`
	// ConnectTimeout bounds connecting to a source.
	ConnectTimeout time.Duration `env:"MIMEO_CONNECT_TIMEOUT, default=10s"`
	// LogicalSyncTimeout bounds how long refresh_logical waits for the
	// stream to reach the source's position.
	LogicalSyncTimeout time.Duration `env:"MIMEO_LOGICAL_SYNC_TIMEOUT, default=5m"`
	// LogicalWALWarning: a slot retaining more WAL than this many bytes on
	// its source is warned about (log and metric).
	LogicalWALWarning int64 `env:"MIMEO_LOGICAL_WAL_WARNING, default=1073741824"`
	// LogicalMemory bounds the bytes of changes a stream holds before
	// applying them; a larger source transaction is applied in pieces.
	LogicalMemory int `env:"MIMEO_LOGICAL_MEMORY, default=16777216"`
	// LogicalStreaming has a source (PostgreSQL 14 and later) stream a
	// large transaction while it is in progress, so that applying it
	// overlaps its decoding; false waits for each commit.
	LogicalStreaming bool `env:"MIMEO_LOGICAL_STREAMING, default=true"`
	// LogicalCheckInterval is how often a stream measures its slot's WAL
	// and compares its tables' partitions with the source's.
	LogicalCheckInterval time.Duration `env:"MIMEO_LOGICAL_CHECK_INTERVAL, default=10s"`
	// Retention is how long finished requests, job logs and stopped agents'
	// rows are kept; older ones are deleted in small batches. 0 keeps them.
	Retention RetentionPeriod `env:"MIMEO_RETENTION, default=30d"`
	// NoopRetention is how long refresh runs that moved nothing (a snap
	// refresh of an unchanged source, an empty queue) are kept; shorter
	// than Retention, as at thousands of tables they are most of the rows.
	// 0 keeps them for Retention.
	NoopRetention RetentionPeriod `env:"MIMEO_NOOP_RETENTION, default=1d"`
	// HousekeepingInterval is how often an agent deletes rows older than
	// Retention.
	HousekeepingInterval time.Duration `env:"MIMEO_HOUSEKEEPING_INTERVAL, default=1h"`
	// ValidateChunkRows is how many source rows one chunk of validate()
	// compares by checksum (and a repair re-pulls at least).
	ValidateChunkRows int `env:"MIMEO_VALIDATE_CHUNK_ROWS, default=10000"`
	// MetricsAddr, when set, serves Prometheus metrics at http://<addr>/metrics.
	MetricsAddr string `env:"MIMEO_METRICS_ADDR"`
	// LogLevel is trace, debug, info, warn or error.
	LogLevel string `env:"MIMEO_LOG_LEVEL, default=info"`
	// LogFormat is text or json.
	LogFormat string `env:"MIMEO_LOG_FORMAT, default=text"`

	// Clock, when set, replaces time.Now where the agent judges the wall
	// clock itself (the DST pause); tests use it. Not read from the
	// environment.
	Clock func() time.Time
	// FaultHook, when set, is called at named points of a run; an error it
	// returns stops the run there, as a crash would. Tests use it.
	FaultHook func(point string) error
	// LogicalFaults, when set, is called at named points of the logical
	// streams ("before commit", "after commit"); tests use it.
	LogicalFaults func(point string) error
}

// now is the configured clock.
func (c Config) now() time.Time {
	if c.Clock != nil {
		return c.Clock()
	}
	return time.Now()
}

// LoadConfig reads the configuration from lookuper (envconfig.OsLookuper()
// for the process environment, envconfig.MapLookuper in tests).
func LoadConfig(ctx context.Context, lookuper envconfig.Lookuper) (Config, error) {
	var c Config
	if err := envconfig.ProcessWith(ctx, &envconfig.Config{Target: &c, Lookuper: lookuper}); err != nil {
		return c, fmt.Errorf("read configuration: %w", err)
	}
	return c, nil
}

// Validate reports the first setting that cannot work.
func (c Config) Validate() error {
	var errs []error
	if c.DatabaseURL == "" {
		errs = append(errs, errors.New("MIMEO_DATABASE_URL is not set: give the destination database, e.g. postgres://mimeo@localhost/warehouse"))
	}
	if c.Workers < 1 {
		errs = append(errs, fmt.Errorf("MIMEO_WORKERS must be at least 1, got %d", c.Workers))
	}
	for name, d := range map[string]time.Duration{
		"MIMEO_POLL_INTERVAL": c.PollInterval, "MIMEO_HEARTBEAT_INTERVAL": c.HeartbeatInterval,
		"MIMEO_AGENT_TIMEOUT": c.AgentTimeout, "MIMEO_CONNECT_TIMEOUT": c.ConnectTimeout,
		"MIMEO_SOURCE_IDLE_TIMEOUT": c.SourceIdleTimeout,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", name, d))
		}
	}
	if c.AgentTimeout > 0 && c.AgentTimeout < 2*c.HeartbeatInterval {
		errs = append(errs, fmt.Errorf("MIMEO_AGENT_TIMEOUT (%s) must be at least twice MIMEO_HEARTBEAT_INTERVAL (%s)", c.AgentTimeout, c.HeartbeatInterval))
	}
	if c.Retention < 0 {
		errs = append(errs, fmt.Errorf("MIMEO_RETENTION must not be negative (0 keeps everything), got %s", time.Duration(c.Retention)))
	}
	if c.NoopRetention < 0 {
		errs = append(errs, fmt.Errorf("MIMEO_NOOP_RETENTION must not be negative (0: as MIMEO_RETENTION), got %s", time.Duration(c.NoopRetention)))
	}
	if c.Retention > 0 && c.HousekeepingInterval <= 0 {
		errs = append(errs, fmt.Errorf("MIMEO_HOUSEKEEPING_INTERVAL must be positive, got %s", c.HousekeepingInterval))
	}
	if c.ValidateChunkRows < 0 {
		errs = append(errs, fmt.Errorf("MIMEO_VALIDATE_CHUNK_ROWS must be positive, got %d", c.ValidateChunkRows))
	}
	if c.MaxAttempts < 1 {
		errs = append(errs, fmt.Errorf("MIMEO_MAX_ATTEMPTS must be at least 1, got %d", c.MaxAttempts))
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("MIMEO_LOG_FORMAT must be text or json, got %q", c.LogFormat))
	}
	switch c.LogLevel {
	case "trace", "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("MIMEO_LOG_LEVEL must be trace, debug, info, warn or error, got %q", c.LogLevel))
	}
	return errors.Join(errs...)
}

// RetentionPeriod is a duration that may also be given in days ("30d").
type RetentionPeriod time.Duration

// EnvDecode reads "30d", or any time.ParseDuration form ("36h").
func (r *RetentionPeriod) EnvDecode(v string) error {
	v = strings.TrimSpace(v)
	if days, ok := strings.CutSuffix(v, "d"); ok {
		n, err := strconv.ParseFloat(days, 64)
		if err != nil {
			return fmt.Errorf("MIMEO_RETENTION: %q is not a number of days", v)
		}
		*r = RetentionPeriod(n * float64(24*time.Hour))
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("MIMEO_RETENTION: %q is neither days (30d) nor a duration (36h)", v)
	}
	*r = RetentionPeriod(d)
	return nil
}
