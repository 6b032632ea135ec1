package agent

import "context"

// The updater type is the inserter for tables whose control column is set
// on insert and on update: each batch replaces rows by key (primary key,
// first unique index, or p_pk_field), set-based through a staging table.

func (a *Agent) makeUpdater(ctx context.Context, r *run) error {
	return a.makeIncremental(ctx, r, "updater")
}

func (a *Agent) refreshUpdater(ctx context.Context, r *run) error {
	return a.refreshIncremental(ctx, r, "updater")
}
