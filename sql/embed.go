// Package sql holds mimeo's destination-side schema: versioned install and
// upgrade scripts, embedded in the binary and also shaped as a PostgreSQL
// extension (mimeo.control + mimeo--X.Y.Z.sql).
package sql

import (
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// files holds the scripts exactly as CREATE EXTENSION reads them.
//
//go:embed mimeo--*.sql mimeo.control
var files embed.FS

// Version is the schema version this binary installs and expects.
const Version = "0.8.0"

// Files returns the embedded extension files (mimeo.control and the
// mimeo--*.sql scripts), for copying into PostgreSQL's extension folder.
func Files() fs.FS { return files }

// step is one script: a full install (from == "") or an upgrade.
type step struct {
	from, to string
	name     string
}

var scriptName = regexp.MustCompile(`^mimeo--([0-9.]+)(?:--([0-9.]+))?\.sql$`)

// steps lists the scripts of scripts that take a database from version
// `from` ("" for none) to target: the newest full script not above target
// when starting fresh, then upgrades in order.
func steps(scripts fs.FS, from, target string) ([]step, error) {
	entries, err := fs.ReadDir(scripts, ".")
	if err != nil {
		return nil, fmt.Errorf("list embedded scripts: %w", err)
	}
	var bases, upgrades []step
	for _, e := range entries {
		m := scriptName.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		if m[2] == "" {
			bases = append(bases, step{to: m[1], name: e.Name()})
		} else {
			upgrades = append(upgrades, step{from: m[1], to: m[2], name: e.Name()})
		}
	}
	sort.Slice(bases, func(i, j int) bool { return CompareVersions(bases[i].to, bases[j].to) < 0 })
	var path []step
	current := from
	if current == "" {
		for _, b := range bases {
			if CompareVersions(b.to, target) <= 0 {
				path = []step{b}
				current = b.to
			}
		}
		if current == "" {
			return nil, fmt.Errorf("no install script for version %s", target)
		}
	}
	for CompareVersions(current, target) < 0 {
		next := step{}
		for _, u := range upgrades {
			if u.from == current {
				next = u
				break
			}
		}
		if next.name == "" {
			return nil, fmt.Errorf("no upgrade script from version %s towards %s", current, target)
		}
		path = append(path, next)
		current = next.to
	}
	if CompareVersions(current, target) > 0 {
		return nil, fmt.Errorf("%w: database has %s, this binary knows %s", ErrNewerSchema, current, target)
	}
	return path, nil
}

// script returns a step's SQL made runnable outside CREATE EXTENSION: the
// psql guard line and the pg_extension_config_dump calls are dropped.
func script(scripts fs.FS, name string) (string, error) {
	b, err := fs.ReadFile(scripts, name)
	if err != nil {
		return "", fmt.Errorf("read embedded %s: %w", name, err)
	}
	var out strings.Builder
	for _, line := range strings.SplitAfter(string(b), "\n") {
		if strings.HasPrefix(line, `\echo`) || strings.Contains(line, "pg_extension_config_dump") {
			continue
		}
		out.WriteString(line)
	}
	return out.String(), nil
}

// CompareVersions orders dotted numeric versions ("0.10.0" > "0.9.1").
func CompareVersions(a, b string) int {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(as) || i < len(bs); i++ {
		var x, y int
		if i < len(as) {
			x, _ = strconv.Atoi(as[i])
		}
		if i < len(bs) {
			y, _ = strconv.Atoi(bs[i])
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}
