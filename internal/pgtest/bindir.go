// Package pgtest starts throwaway PostgreSQL clusters for tests.
//
// Tests run against real servers, never mocks. A test binary's TestMain calls
// Main, which starts a logical-replication source cluster and a destination
// cluster; tests reach them through Source and Destination and get a private
// database each from NewDatabase.
package pgtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// BinDirEnv names the environment variable that, when set, overrides where
// FindBinDir looks for the PostgreSQL server binaries.
const BinDirEnv = "MIMEO_PG_BINDIR"

// installHint is the advice given whenever no server binaries are found.
const installHint = "install PostgreSQL server binaries: apt-get install -y postgresql (Debian/Ubuntu) or set " + BinDirEnv

// FindBinDir returns the directory that holds initdb and pg_ctl. It tries, in
// order: $MIMEO_PG_BINDIR, `pg_config --bindir`, the highest version under
// /usr/lib/postgresql/*/bin, and finally initdb on PATH.
func FindBinDir() (string, error) {
	if dir := os.Getenv(BinDirEnv); dir != "" {
		if hasServerBinaries(dir) {
			return dir, nil
		}
		return "", fmt.Errorf("pgtest: %s=%q does not hold initdb and pg_ctl: %s", BinDirEnv, dir, installHint)
	}
	// pg_config may come from the client-only package, so its bindir is only
	// trusted when initdb is actually there.
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if dir := strings.TrimSpace(string(out)); hasServerBinaries(dir) {
			return dir, nil
		}
	}
	if dir := highestDebianBinDir(); dir != "" {
		return dir, nil
	}
	if path, err := exec.LookPath("initdb"); err == nil {
		if dir := filepath.Dir(path); hasServerBinaries(dir) {
			return dir, nil
		}
	}
	return "", errors.New("pgtest: PostgreSQL server binaries (initdb, pg_ctl) not found: " + installHint)
}

// highestDebianBinDir returns the bin directory of the newest PostgreSQL
// installed the Debian way (/usr/lib/postgresql/<version>/bin), or "".
func highestDebianBinDir() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	var candidates []string
	for _, d := range dirs {
		if hasServerBinaries(d) {
			candidates = append(candidates, d)
		}
	}
	if len(candidates) == 0 {
		return ""
	}
	// Compare versions numerically so that 15 beats 9.6.
	version := func(dir string) []int {
		var v []int
		for _, p := range strings.Split(filepath.Base(filepath.Dir(dir)), ".") {
			n, _ := strconv.Atoi(p)
			v = append(v, n)
		}
		return v
	}
	sort.Slice(candidates, func(i, j int) bool {
		a, b := version(candidates[i]), version(candidates[j])
		for k := 0; k < len(a) && k < len(b); k++ {
			if a[k] != b[k] {
				return a[k] > b[k]
			}
		}
		return len(a) > len(b)
	})
	return candidates[0]
}

// hasServerBinaries reports whether dir holds executable initdb and pg_ctl.
func hasServerBinaries(dir string) bool {
	for _, name := range []string{"initdb", "pg_ctl"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			return false
		}
	}
	return true
}
