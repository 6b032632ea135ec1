package agent

// Fault points a test can stop (or hold) a run at (Config.FaultHook).
const (
	faultRunStarted         = "run started" // with its table and schema locks held
	faultAfterDestCommit    = "after destination commit"
	faultRepullBeforeCommit = "repull before destination commit"
)

// fault lets a test stop a run at a named point (Config.FaultHook).
func (a *Agent) fault(point string) error {
	if a.cfg.FaultHook == nil {
		return nil
	}
	return a.cfg.FaultHook(point)
}
