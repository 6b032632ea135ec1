package agent

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
)

// A timestamp-without-time-zone control column on a source whose clock
// observes daylight saving time repeats an hour (or skips one) on the
// change day: rows written in that hour may carry control values behind
// last_value. Like mimeo, runs on such tables pause during a window of the
// change day (dst_start..dst_end, HHMM in the source's local time).

// On the source, in its own time zone: is the day of $1 a DST change day
// (different UTC offsets at its two midnights), and what time is it there?
const sqlDSTDay = `
SELECT extract(timezone FROM date_trunc('day', $1::timestamptz))
       <> extract(timezone FROM date_trunc('day', $1::timestamptz) + interval '1 day'),
       to_char($1::timestamptz, 'HH24MI')::int`

// observesDST reports whether the source's time zone is not plain UTC
// (its offset is not zero in January or in July).
const sqlObservesDST = `
SELECT extract(timezone FROM '2001-01-15 12:00'::timestamp::timestamptz) <> 0
    OR extract(timezone FROM '2001-07-15 12:00'::timestamp::timestamptz) <> 0`

// dstPause reports whether the run must pause now, with a message saying so.
func (a *Agent) dstPause(ctx context.Context, src *pgxpool.Conn, cfg *incConfig) (bool, string, error) {
	now := a.cfg.now()
	var changeDay bool
	var hhmm int
	if err := src.QueryRow(ctx, sqlDSTDay, now).Scan(&changeDay, &hhmm); err != nil {
		return false, "", fmt.Errorf("check DST window: %w", err)
	}
	if !changeDay || hhmm < cfg.DstStart || hhmm > cfg.DstEnd {
		return false, "", nil
	}
	return true, fmt.Sprintf("paused: it is %04d on a DST change day on the source, inside the dst_start..dst_end window %04d-%04d",
		hhmm, cfg.DstStart, cfg.DstEnd), nil
}
