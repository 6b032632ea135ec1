package pgtest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Options configures StartCluster.
type Options struct {
	// Name labels the cluster in its temp folder name and in messages.
	Name string
	// Settings are postgresql.conf parameters that override the harness
	// defaults, e.g. {"wal_level": "logical"}. "port" and
	// "unix_socket_directories" are chosen by the harness and may not be set.
	Settings map[string]string
}

// Cluster is a running throwaway PostgreSQL cluster.
type Cluster struct {
	// Name is the label given in Options.
	Name string
	// Dir is the cluster's data directory.
	Dir string
	// SocketDir is the directory holding the server's Unix socket; it is the
	// cluster's temp folder, which also holds Dir and the server log.
	SocketDir string
	// Port is the TCP port the server listens on at 127.0.0.1 (and the
	// number in its Unix socket's name).
	Port int
	// Superuser is the bootstrap superuser, "postgres". It connects over the
	// Unix socket without a password.
	Superuser string

	root    string              // temp folder; removed by Stop
	binDir  string              // where initdb and pg_ctl live
	cred    *syscall.Credential // non-nil when commands must drop root
	osUser  string              // the OS user in cred
	logPath string

	stopOnce sync.Once
	stopErr  error
}

// Default server settings: durability is traded for speed because the data is
// thrown away, and replication slots/senders are available for logical
// replication tests.
var defaultSettings = map[string]string{
	"listen_addresses":      "127.0.0.1",
	"fsync":                 "off",
	"synchronous_commit":    "off",
	"full_page_writes":      "off",
	"max_connections":       "300",
	"shared_buffers":        "128MB",
	"max_wal_senders":       "40",
	"max_replication_slots": "40",
	"log_min_messages":      "warning",
	"logging_collector":     "off",
}

// hbaPrefix goes at the top of pg_hba.conf (first match wins): the Unix
// socket trusts everyone, so the harness needs no password, while TCP always
// demands a SCRAM password, so tests can check that a role's password is
// enforced.
const hbaPrefix = `# added by pgtest
local all         all              trust
local replication all              trust
host  all         all 127.0.0.1/32 scram-sha-256
host  replication all 127.0.0.1/32 scram-sha-256

`

// maxSocketPath is the longest Unix socket path the kernel accepts (sun_path
// is 108 bytes including the terminating NUL).
const maxSocketPath = 107

// StartCluster creates and starts a new cluster in a fresh temp folder. The
// caller must call Stop to shut it down and remove the folder.
func StartCluster(opts Options) (*Cluster, error) {
	for _, k := range []string{"port", "unix_socket_directories"} {
		if _, ok := opts.Settings[k]; ok {
			return nil, fmt.Errorf("pgtest: setting %q is managed by pgtest and cannot be overridden", k)
		}
	}
	binDir, err := FindBinDir()
	if err != nil {
		return nil, err
	}
	name := opts.Name
	if name == "" {
		name = "cluster"
	}
	root, err := os.MkdirTemp(os.TempDir(), "mimeo-pgtest-"+name+"-")
	if err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	c := &Cluster{
		Name:      name,
		Dir:       filepath.Join(root, "data"),
		SocketDir: root,
		Superuser: "postgres",
		root:      root,
		binDir:    binDir,
		logPath:   filepath.Join(root, "log"),
	}
	if err := c.start(opts.Settings); err != nil {
		os.RemoveAll(root)
		return nil, fmt.Errorf("pgtest: start cluster %q: %w", name, err)
	}
	return c, nil
}

// start runs initdb, writes the configuration and starts the server.
func (c *Cluster) start(settings map[string]string) error {
	if n := len(filepath.Join(c.SocketDir, ".s.PGSQL.65535")); n > maxSocketPath {
		return fmt.Errorf("unix socket path in %s would be %d bytes, over the kernel limit of %d: set TMPDIR to a shorter folder", c.SocketDir, n, maxSocketPath)
	}
	if err := c.dropRoot(); err != nil {
		return err
	}
	if err := c.initdb(); err != nil {
		return err
	}
	conf := maps.Clone(defaultSettings)
	maps.Copy(conf, settings)
	conf["unix_socket_directories"] = c.SocketDir
	if err := appendSettings(filepath.Join(c.Dir, "postgresql.conf"), conf); err != nil {
		return err
	}
	if err := prependFile(filepath.Join(c.Dir, "pg_hba.conf"), hbaPrefix); err != nil {
		return err
	}

	// The free port is only reserved until the listener closes, so another
	// process (or the other cluster starting in parallel) may grab it first;
	// retry with a fresh port when the server cannot bind.
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			return err
		}
		c.Port = port
		if err := appendSettings(filepath.Join(c.Dir, "postgresql.conf"), map[string]string{"port": strconv.Itoa(port)}); err != nil {
			return err
		}
		logStart := fileSize(c.logPath)
		out, err := c.command("pg_ctl", "-D", c.Dir, "-l", c.logPath, "-w", "-t", "60", "start").CombinedOutput()
		if err == nil {
			return nil
		}
		logTail := c.logTail(logStart)
		lastErr = fmt.Errorf("pg_ctl start: %w\n%s\nserver log (%s):\n%s", err, bytes.TrimSpace(out), c.logPath, logTail)
		// pg_ctl may give up waiting while the postmaster still runs.
		c.command("pg_ctl", "-D", c.Dir, "-m", "immediate", "-w", "stop").Run()
		if !strings.Contains(logTail, "could not bind") && !strings.Contains(logTail, "already in use") {
			break
		}
	}
	return lastErr
}

// dropRoot prepares to run the server as an unprivileged OS user when the test
// runs as root, because initdb, pg_ctl and postgres refuse to run as root.
// The "postgres" user is preferred, "nobody" is the fallback. The temp folder
// is handed to that user; the root test process can still connect to the
// socket inside it, since root bypasses file permissions.
func (c *Cluster) dropRoot() error {
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		if u, err = user.Lookup("nobody"); err != nil {
			return fmt.Errorf("running as root and neither the postgres nor the nobody OS user exists: %w", err)
		}
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return fmt.Errorf("uid of OS user %s: %w", u.Username, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return fmt.Errorf("gid of OS user %s: %w", u.Username, err)
	}
	c.osUser = u.Username
	// An empty Groups list drops root's supplementary groups too.
	c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	return filepath.WalkDir(c.root, func(path string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, int(uid), int(gid))
	})
}

// initdb creates the data directory, preferring the C.UTF-8 locale and
// falling back to --no-locale where that locale is not installed.
func (c *Cluster) initdb() error {
	base := []string{"-D", c.Dir, "-U", c.Superuser, "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"}
	out, err := c.command("initdb", append(base, "--locale=C.UTF-8")...).CombinedOutput()
	if err == nil {
		return nil
	}
	os.RemoveAll(c.Dir)
	out2, err2 := c.command("initdb", append(base, "--no-locale")...).CombinedOutput()
	if err2 == nil {
		return nil
	}
	return fmt.Errorf("initdb --locale=C.UTF-8: %w\n%s\ninitdb --no-locale: %w\n%s", err, bytes.TrimSpace(out), err2, bytes.TrimSpace(out2))
}

// command builds an exec.Cmd for a PostgreSQL binary, run as the unprivileged
// user when needed, inside the temp folder (the test's working directory may
// be unreadable to that user) and with HOME pointing at the temp folder (the
// user's own home may not exist). PG* variables are dropped so the caller's
// environment cannot redirect the tools.
func (c *Cluster) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(c.binDir, name), args...)
	cmd.Dir = c.root
	env := []string{"HOME=" + c.root}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "HOME=") && !strings.HasPrefix(kv, "PG") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	if c.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	}
	return cmd
}

// Stop shuts the server down at once (pg_ctl stop -m immediate) and removes
// the cluster's temp folder. Calling it again returns the first result.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		if out, err := c.command("pg_ctl", "-D", c.Dir, "-m", "immediate", "-w", "-t", "60", "stop").CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("pgtest: stop cluster %q: %w\n%s", c.Name, err, bytes.TrimSpace(out)))
		}
		if err := os.RemoveAll(c.root); err != nil {
			errs = append(errs, fmt.Errorf("pgtest: remove cluster %q: %w", c.Name, err))
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// ConnString returns a libpq key=value conninfo that reaches db as user over
// the cluster's Unix socket, with password added when non-empty.
func (c *Cluster) ConnString(db, user, password string) string {
	return conninfo(c.SocketDir, c.Port, db, user, password)
}

// TCPConnString is like ConnString but connects over TCP to 127.0.0.1, where
// the server always demands a SCRAM password. SSL is disabled, as the
// clusters have no certificates.
func (c *Cluster) TCPConnString(db, user, password string) string {
	return conninfo("127.0.0.1", c.Port, db, user, password) + " sslmode=disable"
}

func conninfo(host string, port int, db, user, password string) string {
	s := "host=" + quoteConnValue(host) + " port=" + strconv.Itoa(port) +
		" dbname=" + quoteConnValue(db) + " user=" + quoteConnValue(user)
	if password != "" {
		s += " password=" + quoteConnValue(password)
	}
	return s
}

// quoteConnValue quotes a conninfo value per libpq rules: values that are
// empty or hold whitespace, quotes or backslashes go in single quotes, with
// backslashes and single quotes escaped by a backslash.
func quoteConnValue(v string) string {
	if v != "" && !strings.ContainsAny(v, " \t\n\v\f\r'\\") {
		return v
	}
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// appendSettings appends "key = 'value'" lines, sorted by key, to a
// postgresql.conf; later lines win over earlier ones.
func appendSettings(path string, settings map[string]string) error {
	var b strings.Builder
	b.WriteString("\n# added by pgtest\n")
	quote := strings.NewReplacer(`\`, `\\`, `'`, `''`)
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		fmt.Fprintf(&b, "%s = '%s'\n", k, quote.Replace(settings[k]))
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(b.String()); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// prependFile puts text at the top of an existing file, keeping its owner.
func prependFile(path, text string) error {
	old, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(text + string(old)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// freePort asks the kernel for an unused TCP port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	return port, l.Close()
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// logTail returns the last lines of the server log written after offset.
func (c *Cluster) logTail(offset int64) string {
	f, err := os.Open(c.logPath)
	if err != nil {
		return "(no server log: " + err.Error() + ")"
	}
	defer f.Close()
	const maxBytes = 4096
	if size := fileSize(c.logPath); size-offset > maxBytes {
		offset = size - maxBytes
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return "(unreadable server log: " + err.Error() + ")"
	}
	b, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// stopHint tells a person how to stop a kept cluster by hand.
func (c *Cluster) stopHint() string {
	pgCtl := filepath.Join(c.binDir, "pg_ctl")
	if c.osUser != "" {
		pgCtl = "runuser -u " + c.osUser + " -- " + pgCtl
	}
	return pgCtl + " -D " + c.Dir + " -m immediate stop && rm -rf " + c.SocketDir
}
