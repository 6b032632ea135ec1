package pgtest

import (
	"fmt"
	"os"
	"sync"
	"testing"
)

// KeepEnv names the environment variable that, when set, makes Main leave its
// clusters running (and their folders in place) after the tests, for
// inspection.
const KeepEnv = "MIMEO_TEST_KEEP"

var source, destination *Cluster

// Source returns the logical-replication source cluster started by Main. It
// panics when called outside a test binary whose TestMain uses Main.
func Source() *Cluster {
	if source == nil {
		panic("pgtest: Source called without pgtest.Main in TestMain")
	}
	return source
}

// Destination returns the destination cluster started by Main. It panics when
// called outside a test binary whose TestMain uses Main.
func Destination() *Cluster {
	if destination == nil {
		panic("pgtest: Destination called without pgtest.Main in TestMain")
	}
	return destination
}

// Main is what TestMain calls: os.Exit(pgtest.Main(m, setup)). It starts a
// source cluster with wal_level=logical and a destination cluster in
// parallel, calls setup (unless nil), runs the tests and stops both clusters,
// or keeps them when $MIMEO_TEST_KEEP is set. It returns the exit code, 1
// when the clusters cannot start or setup fails.
func Main(m *testing.M, setup func(src, dst *Cluster) error) int {
	var (
		wg             sync.WaitGroup
		srcErr, dstErr error
	)
	wg.Go(func() {
		source, srcErr = StartCluster(Options{Name: "source", Settings: map[string]string{"wal_level": "logical"}})
	})
	wg.Go(func() {
		destination, dstErr = StartCluster(Options{Name: "destination"})
	})
	wg.Wait()

	keep := os.Getenv(KeepEnv) != ""
	defer func() {
		for _, c := range []*Cluster{source, destination} {
			switch {
			case c == nil:
			case keep:
				fmt.Fprintf(os.Stderr, "pgtest: keeping cluster %s running: psql %q; stop it with: %s\n",
					c.Name, c.ConnString("postgres", c.Superuser, ""), c.stopHint())
			default:
				if err := c.Stop(); err != nil {
					fmt.Fprintln(os.Stderr, err)
				}
			}
		}
	}()

	for _, err := range []error{srcErr, dstErr} {
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			keep = false
			return 1
		}
	}
	if setup != nil {
		if err := setup(source, destination); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: setup: %v\n", err)
			return 1
		}
	}
	return m.Run()
}
