package agent

import "context"

// The logdel type is dml that keeps what the source deletes: a key gone
// from the source stays on the destination with its last values and
// mimeo_source_deleted set (the queue keeps deleted rows' values for it).
// A key deleted and inserted again is live.

func (a *Agent) makeLogdel(ctx context.Context, r *run) error { return a.makeQueued(ctx, r, "logdel") }

func (a *Agent) refreshLogdel(ctx context.Context, r *run) error {
	return a.refreshQueued(ctx, r, "logdel")
}

func (a *Agent) destroyLogdel(ctx context.Context, r *run) error {
	return a.destroyQueued(ctx, r, "logdel")
}
