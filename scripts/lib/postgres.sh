# shellcheck shell=bash
#
# scripts/lib/postgres.sh: throwaway PostgreSQL clusters for mimeo's scripts.
#
# Source it from a bash script, then:
#
#   ensure_postgres                 find (or install) the server binaries;
#                                   exports PG_BINDIR and puts it first in PATH
#   start_cluster NAME [LINE...]    initdb + start a cluster in a fresh temp
#                                   folder; LINEs are extra postgresql.conf
#                                   lines ("wal_level = logical"). Sets
#                                   NAME_HOST (socket folder), NAME_PORT (TCP
#                                   port on 127.0.0.1), NAME_DIR (temp folder),
#                                   NAME_DATA (data folder), NAME_LOG (log).
#   stop_cluster NAME               stop it (pg_ctl stop -m fast), remove it
#   stop_all_clusters               stop every cluster started here; safe in
#                                   an EXIT trap, safe to call twice
#   pg_as_owner CMD...              run CMD as the OS user the servers run as
#
# The bootstrap superuser is always "postgres"; it connects over the Unix
# socket without a password (psql -h "$NAME_HOST" -p "$NAME_PORT" -U postgres).
# TCP (127.0.0.1) always asks for a SCRAM password.
#
# PostgreSQL refuses to run as root: when run as root, the servers run as the
# "postgres" OS user if there is one, else as "nobody".

# Clusters started by start_cluster and not stopped yet.
MIMEO_PG_CLUSTERS=()

pg_log() { printf '%s\n' "$*" >&2; }

pg_die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

# pg_has_server_binaries DIR: does DIR hold executable initdb and pg_ctl?
pg_has_server_binaries() {
	[[ -n $1 && -x $1/initdb && -x $1/pg_ctl && -x $1/postgres ]]
}

# pg_find_bindir: print the folder holding the server binaries, or fail.
pg_find_bindir() {
	local dir
	if [[ -n ${MIMEO_PG_BINDIR:-} ]]; then
		if pg_has_server_binaries "$MIMEO_PG_BINDIR"; then
			printf '%s\n' "$MIMEO_PG_BINDIR"
			return 0
		fi
		pg_die "MIMEO_PG_BINDIR=$MIMEO_PG_BINDIR does not hold initdb, pg_ctl and postgres"
	fi
	# pg_config may come from the client-only package: only trust its bindir
	# when initdb is really there.
	if command -v pg_config >/dev/null 2>&1; then
		dir=$(pg_config --bindir 2>/dev/null || true)
		if pg_has_server_binaries "$dir"; then
			printf '%s\n' "$dir"
			return 0
		fi
	fi
	# The newest Debian-style install, compared by version number (15 > 9.6).
	dir=$(
		for d in /usr/lib/postgresql/*/bin; do
			if pg_has_server_binaries "$d"; then
				v=${d#/usr/lib/postgresql/}
				printf '%s\t%s\n' "${v%/bin}" "$d"
			fi
		done | sort -t. -k1,1nr -k2,2nr | head -n 1 | cut -f2
	)
	if [[ -n $dir ]]; then
		printf '%s\n' "$dir"
		return 0
	fi
	if dir=$(command -v initdb 2>/dev/null); then
		dir=$(dirname "$dir")
		if pg_has_server_binaries "$dir"; then
			printf '%s\n' "$dir"
			return 0
		fi
	fi
	return 1
}

pg_install_hint() {
	cat >&2 <<'EOF'
PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found.
Install them, then run this again:
  Debian/Ubuntu:  sudo apt-get install postgresql
  other systems:  install the PostgreSQL 15 (or newer) server and set
                  MIMEO_PG_BINDIR to the folder that holds initdb and pg_ctl,
                  e.g. MIMEO_PG_BINDIR=/usr/local/pgsql/bin
EOF
}

pg_apt_install() {
	pg_log "$1"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y "${@:2}"
}

# ensure_postgres: find the server binaries, installing them with apt-get
# when run as root on Debian/Ubuntu, else explain what to install and exit 1.
ensure_postgres() {
	local dir
	if [[ -n ${MIMEO_PG_BINDIR:-} ]] && ! pg_has_server_binaries "$MIMEO_PG_BINDIR"; then
		pg_die "MIMEO_PG_BINDIR=$MIMEO_PG_BINDIR does not hold initdb, pg_ctl and postgres"
	fi
	if ! dir=$(pg_find_bindir); then
		if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
			pg_apt_install "PostgreSQL server binaries not found; installing them: apt-get install -y postgresql" postgresql >&2 ||
				pg_die "apt-get install -y postgresql failed"
			dir=$(pg_find_bindir) || {
				pg_install_hint
				exit 1
			}
		else
			pg_install_hint
			exit 1
		fi
	fi
	PG_BINDIR=$dir
	export PG_BINDIR
	# The client tools of the same version as the server come first.
	PATH=$PG_BINDIR:$PATH
	export PATH
	if ! command -v psql >/dev/null 2>&1 || ! command -v pg_dump >/dev/null 2>&1; then
		if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
			pg_apt_install "psql not found; installing it: apt-get install -y postgresql-client" postgresql-client >&2 ||
				pg_die "apt-get install -y postgresql-client failed"
		fi
		command -v psql >/dev/null 2>&1 ||
			pg_die "psql not found: install the PostgreSQL client (Debian/Ubuntu: sudo apt-get install postgresql-client)"
	fi
}

# pg_owner: the OS user the servers run as ("" when not root: ourselves).
pg_owner() {
	if [[ $(id -u) -ne 0 ]]; then
		return 0
	fi
	if id postgres >/dev/null 2>&1; then
		printf 'postgres\n'
	else
		printf 'nobody\n'
	fi
}

# pg_as_owner CMD...: run CMD as the unprivileged server owner when root, from
# "/" (the caller's folder may be unreadable for that user).
pg_as_owner() {
	local owner
	owner=$(pg_owner)
	if [[ -z $owner ]]; then
		"$@"
		return
	fi
	(
		cd / || exit 1
		if command -v runuser >/dev/null 2>&1; then
			exec runuser -u "$owner" -- "$@"
		elif command -v setpriv >/dev/null 2>&1; then
			exec setpriv --reuid="$owner" --regid="$(id -g "$owner")" --init-groups -- "$@"
		else
			exec su -s /bin/sh "$owner" -c "$(printf '%q ' "$@")"
		fi
	)
}

# pg_free_port: print a TCP port on 127.0.0.1 that nobody listens on now.
pg_free_port() {
	if command -v python3 >/dev/null 2>&1; then
		python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()' && return 0
	fi
	local port i
	for ((i = 0; i < 200; i++)); do
		port=$((20000 + RANDOM % 40000))
		# A refused connection means the port is free.
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			printf '%s\n' "$port"
			return 0
		fi
	done
	pg_die "no free TCP port found on 127.0.0.1"
}

pg_valid_name() {
	[[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || pg_die "cluster name '$1' must be a shell identifier"
}

# start_cluster NAME [postgresql.conf line...]
start_cluster() {
	local name=$1
	shift
	pg_valid_name "$name"
	[[ -n ${PG_BINDIR:-} ]] || ensure_postgres
	local root owner data logfile conf port attempt line
	# Registered first, so that stop_all_clusters (in an EXIT trap) removes
	# whatever exists of it, however early this is interrupted.
	MIMEO_PG_CLUSTERS+=("$name")
	printf -v "${name}_DIR" '%s' ""
	root=$(mktemp -d "${TMPDIR:-/tmp}/mimeo-$name.XXXXXX")
	printf -v "${name}_DIR" '%s' "$root"
	# sun_path holds 107 bytes: <root>/.s.PGSQL.<port> must fit.
	if ((${#root} + 17 > 107)); then
		rm -rf "$root"
		pg_die "temp folder $root is too long for a Unix socket path: set TMPDIR to a shorter folder"
	fi
	owner=$(pg_owner)
	if [[ -n $owner ]]; then
		chown "$owner:" "$root"
	fi
	data=$root/data
	logfile=$root/postgres.log
	printf -v "${name}_DATA" '%s' "$data"
	printf -v "${name}_LOG" '%s' "$logfile"
	printf -v "${name}_HOST" '%s' "$root"
	printf -v "${name}_PORT" '%s' ""

	if ! (pg_as_owner "$PG_BINDIR/initdb" -D "$data" -U postgres -E UTF8 --locale=C \
		--auth-local=trust --auth-host=scram-sha-256 --no-sync) >"$root/initdb.log" 2>&1; then
		cat "$root/initdb.log" >&2
		pg_die "initdb for cluster $name failed"
	fi
	conf=$data/postgresql.conf
	{
		printf '\n# added by scripts/lib/postgres.sh\n'
		printf "listen_addresses = '127.0.0.1'\n"
		printf "unix_socket_directories = '%s'\n" "$root"
		printf 'fsync = off\n'
		printf 'synchronous_commit = off\n'
		printf 'full_page_writes = off\n'
		printf 'max_connections = 100\n'
		printf 'logging_collector = off\n'
		printf "log_min_messages = warning\n"
		for line in "$@"; do
			printf '%s\n' "$line"
		done
	} >>"$conf"

	# A free port is only free until someone takes it: retry on a bind error.
	for attempt in 1 2 3 4 5; do
		port=$(pg_free_port)
		printf 'port = %s\n' "$port" >>"$conf"
		if (pg_as_owner "$PG_BINDIR/pg_ctl" -D "$data" -l "$logfile" -w -t 60 start) >"$root/pg_ctl.log" 2>&1; then
			printf -v "${name}_PORT" '%s' "$port"
			return 0
		fi
		if ! grep -q 'could not bind\|could not create any TCP/IP sockets\|already in use' "$logfile" 2>/dev/null; then
			break
		fi
		pg_log "port $port was taken; trying another (attempt $attempt)"
	done
	cat "$root/pg_ctl.log" "$logfile" >&2 2>/dev/null || true
	pg_die "cluster $name did not start (log: $logfile)"
}

# stop_cluster NAME: stop the server and remove its folder.
stop_cluster() {
	local name=$1 root data i v
	pg_valid_name "$name"
	v=${name}_DIR
	root=${!v:-}
	v=${name}_DATA
	data=${!v:-}
	if [[ -n $data && -f $data/postmaster.pid ]]; then
		(pg_as_owner "$PG_BINDIR/pg_ctl" -D "$data" -m fast -w -t 60 stop) >/dev/null 2>&1 ||
			pg_log "warning: could not stop cluster $name cleanly (data: $data)"
	fi
	# Only ever remove a folder start_cluster made.
	if [[ -n $root && -d $root && $(basename "$root") == mimeo-"$name".* ]]; then
		rm -rf "$root"
	fi
	for i in "${!MIMEO_PG_CLUSTERS[@]}"; do
		if [[ ${MIMEO_PG_CLUSTERS[$i]} == "$name" ]]; then
			unset 'MIMEO_PG_CLUSTERS[i]'
		fi
	done
	MIMEO_PG_CLUSTERS=("${MIMEO_PG_CLUSTERS[@]}")
	unset "${name}_DIR" "${name}_DATA" "${name}_LOG" "${name}_HOST" "${name}_PORT"
}

# stop_all_clusters: stop every cluster this script started, newest first.
stop_all_clusters() {
	local i
	for ((i = ${#MIMEO_PG_CLUSTERS[@]} - 1; i >= 0; i--)); do
		stop_cluster "${MIMEO_PG_CLUSTERS[$i]}"
	done
	MIMEO_PG_CLUSTERS=()
}

# forget_clusters: keep the clusters running after the script exits (the
# caller then owns stopping them).
forget_clusters() {
	MIMEO_PG_CLUSTERS=()
}
