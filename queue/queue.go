// Package queue is mimeo's request queue on the destination: requests are
// enqueued by the SQL functions (or Enqueue), claimed by agents with
// FOR UPDATE SKIP LOCKED, and finished with their outcome.
package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Channel is the NOTIFY channel that mimeo.enqueue() signals.
const Channel = "mimeo_request"

// Status values of mimeo.request.status.
const (
	StatusQueued  = "queued"
	StatusRunning = "running"
	StatusDone    = "done"
	StatusFailed  = "failed"
	StatusSkipped = "skipped"
)

// ErrNotClaimed means the request was not in a state the caller could take.
var ErrNotClaimed = errors.New("request is not queued")

// DB is what the queue needs: a pool, a connection or a transaction.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Request is one row of mimeo.request, as an agent sees it.
type Request struct {
	ID          int64
	Action      string
	DestTable   string
	Args        json.RawMessage
	RequestedBy string
	RequestedAt time.Time
	Attempts    int
}

// Outcome is how a request ended.
type Outcome struct {
	Status  string // done, failed or skipped
	Rows    int64
	JobID   int64
	Message string
	Error   string
}

const (
	sqlEnqueue = `SELECT mimeo.enqueue($1, $2, $3)`

	requestColumns = `r.id, r.action, coalesce(r.dest_table, ''), r.args, r.requested_by, r.requested_at, r.attempts`

	// Oldest first, at most max_runs per source (mimeo.claim serializes
	// claims, so agents claiming at once cannot overrun a source).
	sqlClaim = `SELECT r.id, r.action, coalesce(r.dest_table, ''), r.args, r.requested_by, r.requested_at, r.attempts
FROM mimeo.claim($1, $2) r`

	sqlClaimID = `
UPDATE mimeo.request r
SET status = 'running', started_at = clock_timestamp(), agent_id = $1,
    attempts = r.attempts + 1, finished_at = NULL
WHERE r.id = (SELECT id FROM mimeo.request WHERE id = $2 AND status = 'queued' FOR UPDATE SKIP LOCKED)
RETURNING ` + requestColumns

	sqlInsertRunning = `
INSERT INTO mimeo.request AS r (action, dest_table, args, status, started_at, agent_id, attempts)
VALUES ($1, $2, $3, 'running', clock_timestamp(), $4, 1)
RETURNING ` + requestColumns

	// Only the agent that holds the request may finish it: a request that
	// recovery handed to someone else is left alone.
	sqlFinish = `
UPDATE mimeo.request
SET status = $3, finished_at = clock_timestamp(), rows_moved = $4,
    job_id = nullif($5, 0), message = nullif($6, ''), error = nullif($7, '')
WHERE id = $1 AND agent_id = $2 AND status = 'running'`

	sqlRequeue = `
UPDATE mimeo.request
SET status = 'queued', agent_id = NULL, started_at = NULL, message = $3
WHERE id = $1 AND agent_id = $2 AND status = 'running'`
)

// Enqueue records a request and notifies the agents, as the SQL functions
// do; the request becomes visible when db's transaction commits.
func Enqueue(ctx context.Context, db DB, action, destTable string, args any) (int64, error) {
	raw, err := json.Marshal(args)
	if err != nil {
		return 0, fmt.Errorf("enqueue %s %s: %w", action, destTable, err)
	}
	var id int64
	if err := db.QueryRow(ctx, sqlEnqueue, action, destTable, raw).Scan(&id); err != nil {
		return 0, fmt.Errorf("enqueue %s %s: %w", action, destTable, err)
	}
	return id, nil
}

// Claim marks up to limit queued requests as running by agentID and
// returns them, oldest first, leaving queued those whose source already
// runs as many as its dblink_mapping.max_runs allows.
func Claim(ctx context.Context, db DB, agentID int64, limit int) ([]Request, error) {
	rows, err := db.Query(ctx, sqlClaim, agentID, limit)
	if err != nil {
		return nil, fmt.Errorf("claim requests: %w", err)
	}
	reqs, err := pgx.CollectRows(rows, scanRequest)
	if err != nil {
		return nil, fmt.Errorf("claim requests: %w", err)
	}
	return reqs, nil
}

// ClaimID claims one given request; ErrNotClaimed when it is not queued
// (already taken, finished, or unknown).
func ClaimID(ctx context.Context, db DB, agentID, id int64) (Request, error) {
	rows, err := db.Query(ctx, sqlClaimID, agentID, id)
	if err != nil {
		return Request{}, fmt.Errorf("claim request %d: %w", id, err)
	}
	req, err := pgx.CollectExactlyOneRow(rows, scanRequest)
	if errors.Is(err, pgx.ErrNoRows) {
		return Request{}, fmt.Errorf("claim request %d: %w", id, ErrNotClaimed)
	}
	if err != nil {
		return Request{}, fmt.Errorf("claim request %d: %w", id, err)
	}
	return req, nil
}

// InsertRunning records a request already claimed by agentID, without a
// notification: for work an agent runs directly (mimeo-agent refresh).
func InsertRunning(ctx context.Context, db DB, agentID int64, action, destTable string, args any) (Request, error) {
	raw, err := json.Marshal(args)
	if err != nil {
		return Request{}, fmt.Errorf("record %s %s: %w", action, destTable, err)
	}
	rows, err := db.Query(ctx, sqlInsertRunning, action, destTable, raw, agentID)
	if err != nil {
		return Request{}, fmt.Errorf("record %s %s: %w", action, destTable, err)
	}
	req, err := pgx.CollectExactlyOneRow(rows, scanRequest)
	if err != nil {
		return Request{}, fmt.Errorf("record %s %s: %w", action, destTable, err)
	}
	return req, nil
}

// Finish records a request's outcome. Call it inside the transaction that
// commits the request's work, so work and outcome land together. It
// reports false when the request was no longer this agent's to finish.
func Finish(ctx context.Context, db DB, agentID, id int64, o Outcome) (bool, error) {
	tag, err := db.Exec(ctx, sqlFinish, id, agentID, o.Status, o.Rows, o.JobID, o.Message, o.Error)
	if err != nil {
		return false, fmt.Errorf("finish request %d: %w", id, err)
	}
	return tag.RowsAffected() == 1, nil
}

// Requeue hands a running request back to the queue, e.g. when the agent
// shuts down before it could finish it.
func Requeue(ctx context.Context, db DB, agentID, id int64, reason string) error {
	if _, err := db.Exec(ctx, sqlRequeue, id, agentID, reason); err != nil {
		return fmt.Errorf("requeue request %d: %w", id, err)
	}
	return nil
}

func scanRequest(row pgx.CollectableRow) (Request, error) {
	var r Request
	err := row.Scan(&r.ID, &r.Action, &r.DestTable, &r.Args, &r.RequestedBy, &r.RequestedAt, &r.Attempts)
	return r, err
}
