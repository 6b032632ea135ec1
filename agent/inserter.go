package agent

import "context"

// The inserter type appends rows whose control column (set on insert)
// passed last_value; see incremental.go for the batching.

func (a *Agent) makeInserter(ctx context.Context, r *run) error {
	return a.makeIncremental(ctx, r, "inserter")
}

func (a *Agent) refreshInserter(ctx context.Context, r *run) error {
	return a.refreshIncremental(ctx, r, "inserter")
}
