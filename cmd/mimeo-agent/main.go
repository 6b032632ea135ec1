// Command mimeo-agent serves mimeo's request queue on a destination
// database: it installs the schema, runs the agent daemon, runs one refresh
// synchronously for cron, and prints the replication status.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/sethvargo/go-envconfig"

	"github.com/mimeo-dev/mimeo/agent"
)

const usage = `mimeo-agent: per-table PostgreSQL replication, driven from SQL.

Usage:
  mimeo-agent install             create or upgrade the mimeo schema on the destination
  mimeo-agent run                 serve requests until SIGINT/SIGTERM
  mimeo-agent refresh <table>     refresh one table now, synchronously (for cron; quiet unless it fails, -v to see it)
  mimeo-agent status [--json]     one line per replicated table with its health; warns (stderr) and
                                exits 4 when a table is failing, invalid, overdue or never run, or
                                no agent is alive
  mimeo-agent version             print versions

The destination database comes from MIMEO_DATABASE_URL or --database-url.
Run "mimeo-agent <command> --help" for a command's flags.

Exit status: 0 on success, 1 on failure, 2 for bad usage, 3 when the
destination's mimeo schema is not this binary's version (install or
upgrade it, or run the matching binary), 4 when status finds a problem.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main without the exit, for tests.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "install":
		err = cmdInstall(ctx, rest, stdout, stderr)
	case "run":
		err = cmdRun(ctx, rest, stderr)
	case "refresh":
		err = cmdRefresh(ctx, rest, stdout, stderr)
	case "status":
		err = cmdStatus(ctx, rest, stdout, stderr)
	case "version":
		err = cmdVersion(ctx, rest, stdout, stderr)
	case "help", "-h", "--help", "-help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "mimeo-agent: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	case errors.Is(err, errUnhealthy):
		return exitUnhealthy
	case errors.Is(err, agent.ErrSchemaMissing), errors.Is(err, agent.ErrSchemaChanged):
		fmt.Fprintf(stderr, "mimeo-agent %s: %v\n", cmd, err)
		return exitSchema
	default:
		fmt.Fprintf(stderr, "mimeo-agent %s: %v\n", cmd, err)
		return 1
	}
}

// exitSchema is the exit status when the destination's schema is not the
// version this binary runs for (not installed, upgraded under a running
// agent, or newer): a supervisor should start the matching binary, or the
// DBA run mimeo-agent install.
const exitSchema = 3

var errUsage = errors.New("usage")

// commonFlags are the flags every command that talks to the destination
// takes; they override the MIMEO_* environment.
type commonFlags struct {
	fs          *flag.FlagSet
	databaseURL string
	logLevel    string
	logFormat   string
}

func newFlags(name, synopsis string, stderr io.Writer) *commonFlags {
	c := &commonFlags{fs: flag.NewFlagSet(name, flag.ContinueOnError)}
	c.fs.SetOutput(stderr)
	c.fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: mimeo-agent %s\n\nFlags (override the MIMEO_* environment):\n", synopsis)
		c.fs.PrintDefaults()
	}
	c.fs.StringVar(&c.databaseURL, "database-url", "", "destination database (MIMEO_DATABASE_URL)")
	c.fs.StringVar(&c.logLevel, "log-level", "", "trace, debug, info, warn or error (MIMEO_LOG_LEVEL)")
	c.fs.StringVar(&c.logFormat, "log-format", "", "text or json (MIMEO_LOG_FORMAT)")
	return c
}

// config reads the environment and applies the flags given.
func (c *commonFlags) config(ctx context.Context) (agent.Config, error) {
	cfg, err := agent.LoadConfig(ctx, envconfig.OsLookuper())
	if err != nil {
		return cfg, err
	}
	if c.databaseURL != "" {
		cfg.DatabaseURL = c.databaseURL
	}
	if c.logLevel != "" {
		cfg.LogLevel = c.logLevel
	}
	if c.logFormat != "" {
		cfg.LogFormat = c.logFormat
	}
	return cfg, cfg.Validate()
}

// newLogger builds the agent's logger: text on a terminal, JSON when asked.
func newLogger(cfg agent.Config, out io.Writer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       "mimeo",
		Level:      hclog.LevelFromString(cfg.LogLevel),
		JSONFormat: cfg.LogFormat == "json",
		Output:     out,
		Color:      hclog.AutoColor,
	})
}
