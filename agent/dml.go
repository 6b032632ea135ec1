package agent

import "context"

// The dml type replays changes that triggers on the source queue: each
// batch deletes the queued keys on the destination and inserts the source's
// current rows. The source objects are in package triggers, the maker and
// destroyer in queuetable_maker.go, the replay in replay.go.

func (a *Agent) makeDML(ctx context.Context, r *run) error { return a.makeQueued(ctx, r, "dml") }

func (a *Agent) refreshDML(ctx context.Context, r *run) error { return a.refreshQueued(ctx, r, "dml") }

func (a *Agent) destroyDML(ctx context.Context, r *run) error { return a.destroyQueued(ctx, r, "dml") }
