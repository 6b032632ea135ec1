package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"

	"github.com/mimeo-dev/mimeo/agent"
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
       coalesce(pending, ''), coalesce(last_value, 'lsn ' || applied_lsn::text, '')
FROM mimeo.refresh_status ORDER BY dest_table`

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newFlags("status", "status [flags]", stderr)
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
	rows, err := conn.Query(ctx, sqlStatus)
	if err != nil {
		return fmt.Errorf("read mimeo.refresh_status: %w", err)
	}
	defer rows.Close()
	w := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "TABLE\tTYPE\tSOURCE\tLAST RUN\tLAST VALUE\tLAST OUTCOME\tPENDING")
	for rows.Next() {
		var dest, typ, src, lastRun, outcome, pending, lastValue string
		var dblink int
		if err := rows.Scan(&dest, &typ, &dblink, &src, &lastRun, &outcome, &pending, &lastValue); err != nil {
			return fmt.Errorf("read mimeo.refresh_status: %w", err)
		}
		fmt.Fprintf(w, "%s\t%s\t%d:%s\t%s\t%s\t%s\t%s\n", dest, typ, dblink, src, lastRun, lastValue, outcome, pending)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("read mimeo.refresh_status: %w", err)
	}
	return w.Flush()
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
