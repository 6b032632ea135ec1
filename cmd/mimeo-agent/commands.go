package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/agent"
	"github.com/mimeo-dev/mimeo/queue"
	mimeosql "github.com/mimeo-dev/mimeo/sql"
)

func cmdInstall(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newFlags("install", "install [flags]", stderr)
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	cfg, err := f.config(ctx)
	if err != nil {
		return err
	}
	conn, err := connectDestination(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	res, err := mimeosql.Installer{Waiting: func(msg string) { fmt.Fprintln(stderr, "mimeo-agent install: "+msg) }}.Run(ctx, conn)
	if err != nil {
		return err
	}
	switch {
	case res.Extension:
		fmt.Fprintf(stdout, "mimeo %s is installed as an extension; nothing to do\n", res.To)
	case res.From == res.To:
		fmt.Fprintf(stdout, "mimeo %s is already installed\n", res.To)
	case res.From == "":
		fmt.Fprintf(stdout, "installed mimeo %s\n", res.To)
	default:
		fmt.Fprintf(stdout, "upgraded mimeo from %s to %s\n", res.From, res.To)
	}
	return nil
}

func cmdRun(ctx context.Context, args []string, stderr io.Writer) error {
	f := newFlags("run", "run [flags]", stderr)
	workers := f.fs.Int("workers", 0, "requests run at once (MIMEO_WORKERS, default 4)")
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	cfg, err := f.config(ctx)
	if err != nil {
		return err
	}
	if *workers > 0 {
		cfg.Workers = *workers
	}
	log := newLogger(cfg, stderr)
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer a.Close()
	return a.Run(ctx)
}

// cmdRefresh runs one refresh for cron: silent when it succeeds (cron
// mails whatever a job prints), the error on stderr and exit status 1 when
// it fails; -v logs the run and prints its outcome.
func cmdRefresh(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newFlags("refresh", "refresh [flags] <schema.table>", stderr)
	debug := f.fs.Bool("debug", false, "log every step (implies -v)")
	verbose := f.fs.Bool("v", false, "log the run and print its outcome")
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	if f.fs.NArg() != 1 {
		f.fs.Usage()
		return errUsage
	}
	cfg, err := f.config(ctx)
	if err != nil {
		return err
	}
	log := hclog.NewNullLogger()
	if *verbose || *debug {
		log = newLogger(cfg, stderr)
	}
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer a.Close()
	start := time.Now()
	out, err := a.RefreshOnce(ctx, f.fs.Arg(0), *debug)
	if err != nil {
		return err
	}
	if !*verbose && !*debug {
		return nil
	}
	fmt.Fprintf(stdout, "%s: %s (%d rows in %s)", f.fs.Arg(0), out.Status, out.Rows, time.Since(start).Round(time.Millisecond))
	if out.Message != "" {
		fmt.Fprintf(stdout, ": %s", out.Message)
	}
	fmt.Fprintln(stdout)
	return nil
}

const sqlStatus = `
SELECT dest_table, type, dblink, source_table,
       coalesce(to_char(last_run, 'YYYY-MM-DD HH24:MI:SS'), 'never'),
       CASE WHEN logical_state IN ('failed', 'needs_resync', 'error') THEN logical_state || ': ' || coalesce(logical_detail, '')
            WHEN logical_state IN ('copying', 'copied') THEN logical_state
            WHEN logical_state = 'ready' THEN 'streaming'
            WHEN last_error IS NOT NULL THEN 'failed: ' || last_error
            WHEN last_success IS NOT NULL THEN 'ok'
            ELSE '-' END,
       coalesce(pending, ''), coalesce(last_value, 'lsn ' || applied_lsn::text, ''),
       health, coalesce(why, ''), last_run, last_success, last_error,
       extract(epoch FROM lag)::float8, extract(epoch FROM period)::float8, last_validated_at, last_validation_ok
FROM mimeo.refresh_status ORDER BY dest_table`

// exitUnhealthy is status' exit status when a table is failing, invalid,
// overdue or never run, or no agent is alive.
const exitUnhealthy = 4

// errUnhealthy makes status exit with exitUnhealthy; the words are on
// stderr already.
var errUnhealthy = errors.New("unhealthy")

// tableStatus is one table in status --json.
type tableStatus struct {
	DestTable        string     `json:"dest_table"`
	Type             string     `json:"type"`
	Dblink           int        `json:"dblink"`
	SourceTable      string     `json:"source_table"`
	LastRun          *time.Time `json:"last_run"`
	LastSuccess      *time.Time `json:"last_success"`
	LastError        *string    `json:"last_error"`
	LagSeconds       *float64   `json:"lag_seconds"`
	PeriodSeconds    *float64   `json:"period_seconds"`
	LastValue        string     `json:"last_value,omitempty"`
	Pending          string     `json:"pending,omitempty"`
	LastValidatedAt  *time.Time `json:"last_validated_at"`
	LastValidationOK *bool      `json:"last_validation_ok"`
	Health           string     `json:"health"`
	Why              string     `json:"why,omitempty"`
}

// statusReport is status --json's document.
type statusReport struct {
	Healthy     bool          `json:"healthy"`
	AgentsAlive int           `json:"agents_alive"`
	LastSeen    *time.Time    `json:"agent_last_seen"`
	Problems    []string      `json:"problems"`
	Tables      []tableStatus `json:"tables"`
}

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newFlags("status", "status [flags]", stderr)
	asJSON := f.fs.Bool("json", false, "print a JSON document instead of the table")
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	cfg, err := f.config(ctx)
	if err != nil {
		return err
	}
	conn, err := connectDestination(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rep := statusReport{Problems: []string{}, Tables: []tableStatus{}}
	if rep.AgentsAlive, rep.LastSeen, err = queue.AliveAgents(ctx, conn, cfg.AgentTimeout); err != nil {
		return err
	}
	rows, err := conn.Query(ctx, sqlStatus)
	if err != nil {
		return fmt.Errorf("read mimeo.refresh_status: %w", err)
	}
	defer rows.Close()
	w := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	if !*asJSON {
		fmt.Fprintln(w, "TABLE\tTYPE\tSOURCE\tLAST RUN\tLAST VALUE\tLAST OUTCOME\tPENDING\tHEALTH")
	}
	for rows.Next() {
		var t tableStatus
		var lastRun, outcome string
		if err := rows.Scan(&t.DestTable, &t.Type, &t.Dblink, &t.SourceTable, &lastRun, &outcome, &t.Pending, &t.LastValue,
			&t.Health, &t.Why, &t.LastRun, &t.LastSuccess, &t.LastError, &t.LagSeconds, &t.PeriodSeconds,
			&t.LastValidatedAt, &t.LastValidationOK); err != nil {
			return fmt.Errorf("read mimeo.refresh_status: %w", err)
		}
		rep.Tables = append(rep.Tables, t)
		if t.Health != "ok" {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%s is %s: %s", t.DestTable, t.Health, t.Why))
		}
		if !*asJSON {
			fmt.Fprintf(w, "%s\t%s\t%d:%s\t%s\t%s\t%s\t%s\t%s\n", t.DestTable, t.Type, t.Dblink, t.SourceTable, lastRun,
				t.LastValue, outcome, t.Pending, t.Health)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read mimeo.refresh_status: %w", err)
	}
	if rep.AgentsAlive == 0 {
		seen := "no agent has ever registered"
		if rep.LastSeen != nil {
			seen = "the last heartbeat was at " + rep.LastSeen.Format(time.RFC3339)
		}
		rep.Problems = append(rep.Problems, "no mimeo-agent is alive ("+seen+"): nothing is refreshed")
	}
	rep.Healthy = len(rep.Problems) == 0
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else if err := w.Flush(); err != nil {
		return err
	}
	for _, p := range rep.Problems {
		fmt.Fprintln(stderr, "mimeo-agent status: warning: "+p)
	}
	if !rep.Healthy {
		return errUnhealthy
	}
	return nil
}

func cmdVersion(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newFlags("version", "version [flags]", stderr)
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "mimeo-agent %s (schema %s)\n", agent.Version, mimeosql.Version)
	cfg, err := f.config(ctx)
	if err != nil {
		return nil // no database given: the binary's versions are all we can tell
	}
	conn, err := connectDestination(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	installed, err := mimeosql.InstalledVersion(ctx, conn)
	if errors.Is(err, mimeosql.ErrNotInstalled) {
		fmt.Fprintln(stdout, "destination: mimeo not installed")
		return nil
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "destination: mimeo schema %s\n", installed)
	return nil
}

// connectDestination opens a connection to the destination; a failure says
// the server's answer first (a wrong password, not the TLS refusal before
// it).
func connectDestination(ctx context.Context, url string) (*pgx.Conn, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("connect to destination: %w", agent.ServerError(err))
	}
	return conn, nil
}
