package queue

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
)

// Listener keeps one dedicated connection LISTENing on Channel and turns
// notifications into wake-ups on C. Notifications are only hints: a missed
// one costs a poll interval, never a request, since the agent also polls.
type Listener struct {
	// Connect opens the dedicated connection.
	Connect func(ctx context.Context) (*pgx.Conn, error)
	// OnConnect, when set, runs on every new connection after LISTEN (the
	// agent takes its liveness lock there).
	OnConnect func(ctx context.Context, conn *pgx.Conn) error
	// Logger receives connection trouble; nil means silent.
	Logger hclog.Logger

	c chan struct{}
}

// NewListener returns a Listener; call Run to start it.
func NewListener(connect func(ctx context.Context) (*pgx.Conn, error), logger hclog.Logger) *Listener {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &Listener{Connect: connect, Logger: logger, c: make(chan struct{}, 1)}
}

// C delivers a wake-up after each notification, and once after every
// (re)connection so a backlog queued meanwhile is fetched.
func (l *Listener) C() <-chan struct{} { return l.c }

// Run listens until ctx ends, reconnecting with a jittered backoff.
func (l *Listener) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := l.listen(ctx)
		if ctx.Err() != nil {
			break
		}
		l.Logger.Warn("notification connection lost; reconnecting", "error", err, "backoff", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff + rand.N(backoff/2+1)):
		}
		backoff = min(backoff*2, 10*time.Second)
	}
	return nil
}

func (l *Listener) listen(ctx context.Context) error {
	conn, err := l.Connect(ctx)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{Channel}.Sanitize()); err != nil {
		return fmt.Errorf("listen %s: %w", Channel, err)
	}
	if l.OnConnect != nil {
		if err := l.OnConnect(ctx, conn); err != nil {
			return err
		}
	}
	// LISTEN first, then look at the backlog, then wait: nothing slips by.
	l.wake()
	for {
		if _, err := conn.WaitForNotification(ctx); err != nil {
			return fmt.Errorf("wait for notification: %w", err)
		}
		l.wake()
	}
}

func (l *Listener) wake() {
	select {
	case l.c <- struct{}{}:
	default:
	}
}
