package logical

import (
	"context"
	"sync/atomic"
	"time"
)

// handoverMax is the most messages the receiver holds for the applier:
// enough to read on through a few destination round trips, bounded
// however the messages are batched (one small transaction per batch while
// the source commits one by one, up to batchMax in a large one).
const handoverMax = 16384

// handover carries the receiver's batches to the applier, bounded by the
// messages they hold rather than by the number of batches.
type handover struct {
	ch      chan []any
	held    atomic.Int64 // messages in ch
	drained chan struct{}
}

func newHandover() *handover {
	return &handover{ch: make(chan []any, handoverMax), drained: make(chan struct{}, 1)}
}

// put hands b over, waiting while the applier holds handoverMax messages;
// tick (nil for none) is served meanwhile.
func (h *handover) put(ctx context.Context, b []any, tick <-chan time.Time, onTick func() error) error {
	for h.held.Load()+int64(len(b)) > handoverMax && h.held.Load() > 0 {
		select {
		case <-h.drained:
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-tick:
			if err := onTick(); err != nil {
				return err
			}
		}
	}
	h.held.Add(int64(len(b)))
	select {
	case h.ch <- b:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// done tells the receiver that the applier has taken b's messages.
func (h *handover) done(b []any) {
	if h.held.Add(-int64(len(b))) <= handoverMax/2 {
		select {
		case h.drained <- struct{}{}:
		default:
		}
	}
}

// pending reports whether batches wait.
func (h *handover) pending() bool { return len(h.ch) > 0 }
