package agent_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The alert rules and the dashboard name only series the agent exports:
// a renamed metric must not leave a rule that never fires.
func TestMonitoringFilesUseExportedSeries(t *testing.T) {
	var code strings.Builder
	for _, dir := range []string{".", "../logical"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		require.NoError(t, err)
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			b, err := os.ReadFile(f)
			require.NoError(t, err)
			code.Write(b)
		}
	}
	exported := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?:Name:\s*|NewDesc\()"(mimeo_[a-z_]+)"`).FindAllStringSubmatch(code.String(), -1) {
		exported[m[1]] = true
	}
	require.Contains(t, exported, "mimeo_table_healthy")
	series := regexp.MustCompile(`\bmimeo_[a-z_]+`)
	for _, f := range []string{"../monitoring/mimeo-alerts.yml", "../monitoring/mimeo-dashboard.json"} {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		names := series.FindAllString(string(b), -1)
		require.NotEmpty(t, names, f)
		for _, n := range names {
			base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")
			require.True(t, exported[base], "%s names %s, which the agent does not export", f, n)
		}
	}
}
