package agent

import "time"

// Helpers that turn Go values into SQL parameters (NULL where empty).

func nullIfEmpty(s []string) []string {
	if len(s) == 0 {
		return nil
	}
	return s
}

func nullString(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func statIns(s *tableStats) *int64 {
	if s == nil {
		return nil
	}
	return &s.Ins
}

func statUpd(s *tableStats) *int64 {
	if s == nil {
		return nil
	}
	return &s.Upd
}

func statDel(s *tableStats) *int64 {
	if s == nil {
		return nil
	}
	return &s.Del
}

// lastRun is the last_run a maker records: when it pulled data, the data
// is as of the run's start; otherwise nothing has been copied yet.
func lastRun(pulled bool, r *run) *time.Time {
	if !pulled {
		return nil
	}
	return &r.started
}
