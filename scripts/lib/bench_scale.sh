# shellcheck shell=bash
# shellcheck disable=SC2154 # source_PORT etc. are set by start_cluster
#
# scripts/lib/bench_scale.sh: scripts/bench --scale, sourced by scripts/bench
# once its two servers run (src, dst, say, heading, die, now, elapsed and
# AGENT, WORK are its).
#
#   n. one agent:    SCALE_TABLES tiny snap tables (10 rows each, one
#                    source), each with a period of SCALE_PERIOD seconds,
#                    their last runs spread evenly over one period; the
#                    agent (4 workers) runs them on schedule for one period.
#                    Reported: how late each run started after it was due
#                    (p50, p99, max; every table due in the window counts,
#                    a table not run counts as missed), the agent's CPU
#                    (of one core, from /proc) and its CPU per run, the
#                    destination's mimeo tables (rows, size).
#   o. three agents: the first SCALE_TABLES / 10 tables only, with a period
#                    of SCALE_PERIOD / 10 (the same rate of runs), shared by
#                    three agents for two periods. Reported: runs per agent,
#                    runs of one table that overlapped (must be 0), requests
#                    run twice, lateness as in n.

SCALE_TABLES=${SCALE_TABLES:-10000}
SCALE_PERIOD=${SCALE_PERIOD:-600}
CLK_TCK=$(getconf CLK_TCK)

# agent_cpu PID: user + system CPU seconds the process has used.
agent_cpu() { awk -v t="$CLK_TCK" '{ printf "%.3f\n", ($14 + $15) / t }' "/proc/$1/stat"; }

# start_agents N LOG: N mimeo-agent run processes; their pids in AGENTS.
AGENTS=()
start_agents() {
	local i
	for ((i = 1; i <= $1; i++)); do
		"$AGENT" run >>"$2.$i" 2>&1 &
		AGENTS+=($!)
	done
	for _ in $(seq 1 100); do
		[[ $(dst -d mimeo -A -t -c "SELECT count(*) FROM mimeo.agent WHERE status = 'running'") -ge $1 ]] && return
		sleep 0.1
	done
	die "the agents did not register"
}
stop_agents() {
	local p
	for p in "${AGENTS[@]}"; do
		kill -TERM "$p" 2>/dev/null || true
	done
	for p in "${AGENTS[@]}"; do
		wait "$p" 2>/dev/null || true
	done
	AGENTS=()
}

# lateness FROM TO: p50, p99 and max seconds between each table's due time
# (in scale_due) within [FROM, TO) and the start of its next run, and how
# many such tables got no run.
lateness() {
	dst -d mimeo -A -t -F ' ' -c "
WITH d AS (SELECT * FROM scale_due WHERE due >= '$1' AND due < '$2'),
s AS (
    SELECT d.dest_table, (SELECT min(r.started_at) FROM mimeo.request r
                          WHERE r.dest_table = d.dest_table AND r.action = 'refresh_snap' AND r.requested_at >= d.due - interval '2 s') - d.due AS late
    FROM d)
SELECT count(*),
       round(extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY late))::numeric, 2),
       round(extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY late))::numeric, 2),
       round(extract(epoch FROM max(late))::numeric, 2),
       count(*) FILTER (WHERE late IS NULL)
FROM s"
}

heading "Scale: $SCALE_TABLES snap tables on one source, a period of ${SCALE_PERIOD}s each"
src -d postgres -c "CREATE DATABASE scale"
t0=$(now)
src -d scale -c "SELECT format('CREATE TABLE public.%I (id int PRIMARY KEY, v text); INSERT INTO public.%I SELECT g, ''v'' || g FROM generate_series(1, 10) g;',
    t, t) FROM (SELECT 's_' || lpad(i::text, 5, '0') AS t FROM generate_series(1, $SCALE_TABLES) i) x" -A -t |
	src -d scale >/dev/null
say "source: $SCALE_TABLES tables of 10 rows in $(elapsed "$t0" "$(now)")s"
dst -d postgres -c "CREATE DATABASE mimeo"
MIMEO_DATABASE_URL="host=$destination_HOST port=$destination_PORT dbname=mimeo user=postgres"
export MIMEO_DATABASE_URL
export MIMEO_LOG_LEVEL=warn MIMEO_POLL_INTERVAL=5s
"$AGENT" install >/dev/null
dst -d mimeo -c "INSERT INTO mimeo.dblink_mapping (data_source, username)
                 VALUES ('host=$source_HOST port=$source_PORT dbname=scale', 'postgres')"
start_agents 1 "$WORK/scale-agent.log"
t0=$(now)
dst -d mimeo -c "SELECT count(mimeo.snapshot_maker('public.' || quote_ident('s_' || lpad(i::text, 5, '0')), 1))
                 FROM generate_series(1, $SCALE_TABLES) i" >/dev/null
while [[ $(dst -d mimeo -A -t -c "SELECT count(*) FROM mimeo.request WHERE status IN ('queued', 'running')") -gt 0 ]]; do
	sleep 1
done
failed=$(dst -d mimeo -A -t -c "SELECT count(*) FROM mimeo.request WHERE status <> 'done'")
((failed == 0)) || die "$failed makers did not end done"
MAKERS_S=$(elapsed "$t0" "$(now)")
say "destination: $SCALE_TABLES snapshot_maker requests done in ${MAKERS_S}s"

# Spread the last runs over one period, so the tables come due evenly.
dst -d mimeo -c "UPDATE mimeo.refresh_config SET period = '$SCALE_PERIOD s',
    last_run = now() - random() * interval '$SCALE_PERIOD s'" \
	-c "CREATE TABLE scale_due AS SELECT dest_table, last_run + period AS due FROM mimeo.refresh_config" \
	-c "VACUUM ANALYZE mimeo.request, mimeo.job_log, mimeo.job_detail"
read -r from < <(dst -d mimeo -A -t -c "SELECT now()")
cpu0=$(agent_cpu "${AGENTS[0]}")
t0=$(now)
say "running for one period (${SCALE_PERIOD}s) plus 10 s..."
sleep "$((SCALE_PERIOD + 10))"
cpu1=$(agent_cpu "${AGENTS[0]}")
WINDOW=$(elapsed "$t0" "$(now)")
read -r to < <(dst -d mimeo -A -t -c "SELECT now() - interval '10 s'")
read -r N_RUNS N_FAILED < <(dst -d mimeo -A -t -F ' ' -c "SELECT count(*), count(*) FILTER (WHERE status <> 'done')
    FROM mimeo.request WHERE action = 'refresh_snap' AND started_at >= '$from'")
read -r N_DUE N_P50 N_P99 N_MAX N_MISSED < <(lateness "$from" "$to")
N_CPU=$(awk -v a="$cpu0" -v b="$cpu1" -v w="$WINDOW" 'BEGIN { printf "%.1f\n", 100 * (b - a) / w }')
N_PER_RUN=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$N_RUNS" 'BEGIN { printf "%.2f\n", (n > 0) ? 1000 * (b - a) / n : 0 }')
SIZES=$(dst -d mimeo -A -t -c "SELECT string_agg(format('%s %s rows %s', t, n, pg_size_pretty(pg_total_relation_size(('mimeo.' || t)::regclass))), '; ')
    FROM (VALUES ('request', (SELECT count(*) FROM mimeo.request)), ('job_log', (SELECT count(*) FROM mimeo.job_log)),
                 ('job_detail', (SELECT count(*) FROM mimeo.job_detail))) v(t, n)")
say "runs: $N_RUNS ($N_FAILED not done); due in the window: $N_DUE, late p50 ${N_P50}s p99 ${N_P99}s max ${N_MAX}s, missed $N_MISSED"
say "agent CPU: ${N_CPU}% of one core, ${N_PER_RUN} ms per run; $SIZES"
stop_agents

heading "Scale: three agents share $((SCALE_TABLES / 10)) tables, a period of $((SCALE_PERIOD / 10))s each"
SHARED=$((SCALE_TABLES / 10))
SHARED_PERIOD=$((SCALE_PERIOD / 10))
dst -d mimeo -c "UPDATE mimeo.refresh_config SET period = NULL" \
	-c "UPDATE mimeo.refresh_config SET period = '$SHARED_PERIOD s', last_run = now() - random() * interval '$SHARED_PERIOD s'
        WHERE dest_table IN (SELECT 'public.' || quote_ident('s_' || lpad(i::text, 5, '0')) FROM generate_series(1, $SHARED) i)" \
	-c "TRUNCATE scale_due" \
	-c "INSERT INTO scale_due SELECT dest_table, last_run + period FROM mimeo.refresh_config WHERE period IS NOT NULL"
read -r from < <(dst -d mimeo -A -t -c "SELECT now()")
start_agents 3 "$WORK/scale-agents.log"
sleep "$((2 * SHARED_PERIOD + 10))"
stop_agents
read -r to < <(dst -d mimeo -A -t -c "SELECT now() - interval '10 s'")
read -r O_RUNS O_AGENTS O_SPLIT O_TWICE O_SKIPPED < <(dst -d mimeo -A -t -F ' ' -c "
SELECT count(*), count(DISTINCT agent_id),
       (SELECT string_agg(n::text, '/' ORDER BY n DESC) FROM (SELECT count(*) AS n FROM mimeo.request
            WHERE action = 'refresh_snap' AND started_at >= '$from' GROUP BY agent_id) a),
       count(*) FILTER (WHERE attempts > 1),
       count(*) FILTER (WHERE status = 'skipped')
FROM mimeo.request WHERE action = 'refresh_snap' AND started_at >= '$from'")
O_OVERLAP=$(dst -d mimeo -A -t -c "
SELECT count(*) FROM mimeo.job_log a JOIN mimeo.job_log b
  ON a.dest_table = b.dest_table AND a.job_id < b.job_id AND b.start_time < a.end_time AND a.start_time < b.end_time
WHERE a.start_time >= '$from' AND a.job_name LIKE 'Refresh Snap%' AND b.job_name LIKE 'Refresh Snap%'")
read -r O_DUE O_P50 O_P99 O_MAX O_MISSED < <(lateness "$from" "$to")
say "runs: $O_RUNS by $O_AGENTS agents ($O_SPLIT); overlapping runs of one table: $O_OVERLAP; run twice: $O_TWICE; skipped: $O_SKIPPED"
say "due in the window: $O_DUE, late p50 ${O_P50}s p99 ${O_P99}s max ${O_MAX}s, missed $O_MISSED"
((O_OVERLAP == 0)) || die "two runs of one table overlapped"

heading "Results: scale"
ROW='%-52s %s\n'
# shellcheck disable=SC2059 # ROW is the format
{
	printf "$ROW" "n. one agent, $SCALE_TABLES tables, period ${SCALE_PERIOD}s:" ""
	printf "$ROW" "  runs in ${WINDOW}s" "$N_RUNS ($N_FAILED not done)"
	printf "$ROW" "  start after due, p50 / p99 / max (s)" "$N_P50 / $N_P99 / $N_MAX (of $N_DUE due; missed $N_MISSED)"
	printf "$ROW" "  agent CPU (% of one core)" "$N_CPU"
	printf "$ROW" "  agent CPU per run (ms)" "$N_PER_RUN"
	printf "$ROW" "  destination mimeo tables" "$SIZES"
	printf "$ROW" "  makers ($SCALE_TABLES, set-up)" "${MAKERS_S}s"
	printf "$ROW" "o. three agents, $SHARED tables, period ${SHARED_PERIOD}s:" ""
	printf "$ROW" "  runs, by agent" "$O_RUNS ($O_SPLIT)"
	printf "$ROW" "  overlapping runs of a table / run twice / skipped" "$O_OVERLAP / $O_TWICE / $O_SKIPPED"
	printf "$ROW" "  start after due, p50 / p99 / max (s)" "$O_P50 / $O_P99 / $O_MAX (of $O_DUE due; missed $O_MISSED)"
	printf '\nTargets:\n'
	printf "$ROW" "  every run starts within 5 s of due:" "$(awk -v m="$N_MAX" -v x="$N_MISSED" 'BEGIN { print (m <= 5 && x == 0) ? "met" : "NOT met" }') (max ${N_MAX}s)"
	printf "$ROW" "  agent under 10% of one core:" "$(awk -v c="$N_CPU" 'BEGIN { print (c < 10) ? "met" : "NOT met" }') (${N_CPU}%)"
	printf "$ROW" "  no-op run <= 5 ms of agent time:" "$(awk -v c="$N_PER_RUN" 'BEGIN { print (c <= 5) ? "met" : "NOT met" }') (${N_PER_RUN} ms)"
	printf "$ROW" "  three agents, no double run:" "$( ((O_OVERLAP == 0 && O_TWICE == 0)) && echo met || echo "NOT met")"
}
