#!/usr/bin/env bash
# Local real-services stack for fraudscore, without Docker: one Kafka broker
# (KRaft, combined broker+controller) run from Maven Central jars, and one Redis.
#
#   eval "$(scripts/stack.sh up)"   # start (idempotent); prints the exports
#   scripts/stack.sh status         # exit 0 only if both services answer
#   scripts/stack.sh down [--purge] # stop what `up` started; --purge drops data
#
# Everything is driven by the environment so that several stacks (e.g. one per
# test harness) can run side by side with their own state dir and ports:
#   FRAUDSCORE_STACK_DIR   state: pid files, logs, data (default: ~/.cache/fraudscore/stack)
#   KAFKA_PORT             broker PLAINTEXT port           (default 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port           (default 9093)
#   REDIS_PORT             Redis port                      (default 6379)
#   KAFKA_VERSION          Kafka release to run            (default 3.9.1)
#   KAFKA_HEAP_OPTS        JVM heap flags                  (default -Xms1g -Xmx1g, as Kafka's own)
#   KAFKA_JVM_PERFORMANCE_OPTS  GC and JIT flags           (default: those of Kafka's
#                          own kafka-run-class.sh: G1 with 20 ms pause goal, ...)
#   KAFKA_OPTS             extra JVM flags                 (default none)
#   KAFKA_READY_TIMEOUT    seconds to wait for the broker  (default 90)
#   FRAUDSCORE_STACK_KEEP_DATA=1  keep the broker's topics across restarts
#                          (default: a broker that `up` starts begins empty)
#
# Stdout carries ONLY the `export ...` lines (so `eval "$(... up)"` works);
# every progress and error message goes to stderr.
set -euo pipefail

# Keep the real stdout on fd 3 for the exports and send everything else,
# including the output of every tool we run, to stderr. Long-lived children
# are started with 3>&- so they never hold the caller's $(...) pipe open.
exec 3>&1 1>&2

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/kafka/pom.xml"
KAFKA_READY="$SCRIPT_DIR/kafka_ready.py"

KAFKA_VERSION="${KAFKA_VERSION:-3.9.1}"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/fraudscore"
# The jar cache lives outside the repo so clean clones and `git clean` keep it.
KAFKA_LIBS="$CACHE_ROOT/kafka-$KAFKA_VERSION/libs"
STATE_DIR="${FRAUDSCORE_STACK_DIR:-$CACHE_ROOT/stack}"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
REDIS_PORT="${REDIS_PORT:-6379}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms1g -Xmx1g}"
# Kafka's own start script passes these; launched bare, the JVM's G1 aims at 200 ms pauses
# and grows the young generation to match, and every pause stalls produce and commit.
KAFKA_JVM_PERFORMANCE_OPTS="${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent}"
KAFKA_OPTS="${KAFKA_OPTS:-}"
KAFKA_READY_TIMEOUT="${KAFKA_READY_TIMEOUT:-90}"

KAFKA_PID="$STATE_DIR/kafka.pid"
KAFKA_LOG="$STATE_DIR/kafka.log"
KAFKA_OUT="$STATE_DIR/kafka.out"          # JVM stdout/stderr (crashes before log4j is up)
KAFKA_DATA="$STATE_DIR/kafka-data"
KAFKA_PROPS="$STATE_DIR/server.properties"
KAFKA_LOG4J="$STATE_DIR/log4j.properties"
REDIS_PID="$STATE_DIR/redis.pid"
REDIS_LOG="$STATE_DIR/redis.log"
# Marker proving a directory was created by this script; `down --purge` refuses
# to delete a directory without it (FRAUDSCORE_STACK_DIR could be mistyped).
STATE_MARKER="$STATE_DIR/.fraudscore-stack"

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# True if something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp,
# so no dependency on ss/nc/lsof).
port_open() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Command line of a live pid, or nothing. /proc where it exists, else ps.
pid_cmdline() {
  if [[ -r "/proc/$1/cmdline" ]]; then
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true
  else
    ps -o args= -p "$1" 2>/dev/null || true
  fi
}

# Prints the pid from pid file $1 if that process is alive AND its command line
# contains $2. The second check guards against a stale pid file whose number
# has been reused by an unrelated process, which `down` must never kill.
live_pid() {
  local file="$1" pattern="$2" pid
  [[ -s "$file" ]] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(pid_cmdline "$pid")" == *"$pattern"* ]] || return 1
  printf '%s\n' "$pid"
}

kafka_pid() { live_pid "$KAFKA_PID" "$KAFKA_PROPS"; }
redis_pid() { live_pid "$REDIS_PID" "redis-server"; }

# Ports a running service was started with (recorded at start), falling back to
# the requested ones, so `status`/`up` report what actually runs.
recorded_port() {
  local file="$1" fallback="$2"
  if [[ -s "$file" ]]; then cat "$file"; else printf '%s\n' "$fallback"; fi
}

kafka_answers() { python3 "$KAFKA_READY" "127.0.0.1:$1" --quiet 2>/dev/null; }
redis_answers() { [[ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" == "PONG" ]]; }

print_exports() {
  printf 'export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:%s\n' "$1" >&3
  printf 'export REDIS_URL=redis://127.0.0.1:%s/0\n' "$2" >&3
}

# --------------------------------------------------------------------------
# Prerequisites
# --------------------------------------------------------------------------

require_java() {
  command -v java >/dev/null || die "java not found: install a JDK >= 17 (e.g. apt-get install openjdk-17-jre-headless)"
  local version major
  version="$(java -version 2>&1 | awk -F'"' '/version/ { print $2; exit }')"
  major="${version#1.}"          # Java 8 reports "1.8.0_x"
  major="${major%%[!0-9]*}"
  [[ -n "$major" && "$major" -ge 17 ]] ||
    die "Kafka $KAFKA_VERSION needs Java >= 17, found '${version:-unknown}' at $(command -v java)"
}

require_python() {
  command -v python3 >/dev/null || die "python3 not found (needed for scripts/kafka_ready.py)"
}

# Run a command as root: directly, or via sudo when available.
as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root to run '$*' and sudo is not available"
  fi
}

apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: no apt-get here; install it yourself"
  log "installing $* with apt-get"
  # Try without `apt-get update` first: it is slow and usually unnecessary.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" ||
    { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; } ||
    die "apt-get install $* failed"
}

ensure_redis_installed() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return 0
  fi
  apt_install redis-server
  # Debian's package may start a system-wide redis on 6379. We want our own
  # instance (no persistence, our pid file) to own the port, so stop it.
  as_root service redis-server stop >/dev/null 2>&1 ||
    as_root systemctl stop redis-server >/dev/null 2>&1 || true
}

# Resolve the Kafka jars into the cache once. They are written to a temp dir
# next to the final one and renamed into place, so an interrupted download
# never looks like a complete cache. A lock serialises concurrent first runs.
ensure_kafka_libs() {
  [[ -d "$KAFKA_LIBS" ]] && return 0
  command -v mvn >/dev/null || die "mvn not found: install Maven >= 3.6 (e.g. apt-get install maven); needed once to fetch the Kafka jars"
  local parent
  parent="$(dirname "$KAFKA_LIBS")"
  mkdir -p "$parent"
  (
    flock 9 2>/dev/null || true    # best effort where flock(1) is missing
    [[ -d "$KAFKA_LIBS" ]] && exit 0   # another run finished it while we waited
    tmp="$(mktemp -d "$parent/.libs.tmp.XXXXXX")"
    mvn_log="$tmp.mvn.log"
    trap 'rm -rf "$tmp" "$mvn_log"' EXIT
    log "resolving Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
    # Maven's output is kept aside and shown only on failure (its -q mode
    # still prints stray ANSI codes in Maven 3.8).
    if ! mvn -B -ntp -f "$POM" dependency:copy-dependencies \
      -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime \
      -DoutputDirectory="$tmp" >"$mvn_log" 2>&1; then
      tail -n 40 "$mvn_log" >&2
      die "could not resolve Kafka $KAFKA_VERSION jars with Maven (network? proxy? see above)"
    fi
    compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null ||
      die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing from $tmp"
    mv -T "$tmp" "$KAFKA_LIBS"
  ) 9>"$parent/.resolve.lock"
}

# --------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------

write_kafka_config() {
  # Regenerated on every start: it is configuration, not data, and ports may change.
  cat >"$KAFKA_PROPS" <<EOF
# Generated by scripts/stack.sh; edits are overwritten on the next 'up'.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DATA

# One broker: every replication factor / ISR must be 1 or transactions and
# consumer groups never become available.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
min.insync.replicas=1
default.replication.factor=1
# Fewer internal partitions than the default 50 make the first consumer-group
# join and the first init_transactions() noticeably faster on a fresh broker.
offsets.topic.num.partitions=5
transaction.state.log.num.partitions=5

# Tests: no 3 s wait before the first rebalance; the app creates its own topics.
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.partitions=3
EOF

  cat >"$KAFKA_LOG4J" <<EOF
# Generated by scripts/stack.sh: broker logs go to a file, not to stdout.
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$KAFKA_LOG
log4j.appender.file.MaxFileSize=50MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.clients=WARN
EOF
}

# Random KRaft cluster id: 16 random bytes, URL-safe base64 without padding
# (what `kafka.tools.StorageTool random-uuid` prints, minus a JVM start).
# Kafka avoids ids starting with '-', which would read as a CLI flag.
random_cluster_id() {
  python3 - <<'EOF'
import base64, uuid
while True:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not cid.startswith("-"):
        print(cid)
        break
EOF
}

format_kafka_storage() {
  # meta.properties is written by the format step; its presence means done.
  [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
  local cluster_id
  cluster_id="$(random_cluster_id)"
  log "formatting KRaft storage in $KAFKA_DATA (cluster id $cluster_id)"
  java -Dlog4j.configuration="file:$KAFKA_LOG4J" -cp "$KAFKA_LIBS/*" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" >/dev/null ||
    die "kafka storage format failed (see $KAFKA_LOG)"
}

# Starts the broker in the background; readiness is checked by wait_kafka so
# that Redis can start meanwhile. Sets STARTED_KAFKA=1 when it launched one.
STARTED_KAFKA=0
start_kafka() {
  local pid running_port
  if pid="$(kafka_pid)"; then
    running_port="$(recorded_port "$STATE_DIR/kafka.port" "$KAFKA_PORT")"
    [[ "$running_port" == "$KAFKA_PORT" ]] ||
      die "Kafka from $STATE_DIR already runs on port $running_port, not $KAFKA_PORT; run 'scripts/stack.sh down' first"
    log "kafka already running (pid $pid)"
    return 0
  fi
  rm -f "$KAFKA_PID"
  # Every test run creates its own uniquely named topics, so a kept log dir only
  # grows: thousands of partitions later the broker spends minutes loading them
  # before it answers (a CI run failed that way). A fresh start begins empty.
  if [[ "${FRAUDSCORE_STACK_KEEP_DATA:-0}" != "1" && -d "$KAFKA_DATA" ]]; then
    log "dropping the previous broker's data in $KAFKA_DATA (FRAUDSCORE_STACK_KEEP_DATA=1 keeps it)"
    rm -rf "$KAFKA_DATA"
  fi
  write_kafka_config
  format_kafka_storage

  log "starting kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT)"
  # kafka.log is appended to across runs; mark where this run begins.
  printf '==== %s scripts/stack.sh: starting kafka\n' "$(date '+%F %T')" >>"$KAFKA_LOG"
  # setsid + nohup: the broker outlives this script and is not killed by a
  # Ctrl-C aimed at the shell that ran `make test`. Word splitting of the
  # *_OPTS variables is intended (they hold several JVM flags).
  # shellcheck disable=SC2086
  setsid nohup java $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS $KAFKA_OPTS \
    -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$KAFKA_LOG4J" \
    -Dkafka.logs.dir="$STATE_DIR" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
    </dev/null >"$KAFKA_OUT" 2>&1 3>&- &
  echo "$!" >"$KAFKA_PID"
  echo "$KAFKA_PORT" >"$STATE_DIR/kafka.port"
  STARTED_KAFKA=1
}

show_kafka_logs() {
  log "last 40 lines of $KAFKA_LOG:"
  tail -n 40 "$KAFKA_LOG" >&2 2>/dev/null || true
  if [[ -s "$KAFKA_OUT" ]]; then
    log "last 20 lines of $KAFKA_OUT (JVM output):"
    tail -n 20 "$KAFKA_OUT" >&2 || true
  fi
}

wait_kafka() {
  local deadline=$((SECONDS + KAFKA_READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    if kafka_answers "$KAFKA_PORT"; then
      return 0
    fi
    if ! kafka_pid >/dev/null; then
      log "kafka exited during startup"
      show_kafka_logs
      rm -f "$KAFKA_PID"
      exit 1
    fi
    sleep 0.25
  done
  log "kafka did not answer a Metadata request within ${KAFKA_READY_TIMEOUT}s"
  show_kafka_logs
  exit 1    # cleanup_failed_up stops the half-started broker if we launched it
}

# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------

STARTED_REDIS=0
start_redis() {
  local pid running_port
  if pid="$(redis_pid)"; then
    running_port="$(recorded_port "$STATE_DIR/redis.port" "$REDIS_PORT")"
    [[ "$running_port" == "$REDIS_PORT" ]] ||
      die "Redis from $STATE_DIR already runs on port $running_port, not $REDIS_PORT; run 'scripts/stack.sh down' first"
    log "redis already running (pid $pid)"
  else
    rm -f "$REDIS_PID"
    log "starting redis on 127.0.0.1:$REDIS_PORT"
    # No persistence: the stack is for tests and demos. --daemonize makes
    # redis fork itself and write the pid file.
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
      --save "" --appendonly no \
      --daemonize yes --pidfile "$REDIS_PID" \
      --logfile "$REDIS_LOG" --dir "$STATE_DIR" 3>&- ||
      die "redis-server failed to start (see $REDIS_LOG)"
    echo "$REDIS_PORT" >"$STATE_DIR/redis.port"
    STARTED_REDIS=1
  fi

  local deadline=$((SECONDS + 20))
  until redis_answers "$REDIS_PORT"; do
    if ((SECONDS >= deadline)); then
      log "redis did not answer PING within 20s; last lines of $REDIS_LOG:"
      tail -n 20 "$REDIS_LOG" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.1
  done
}

# --------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------

# stop_service NAME PIDFILE CMDLINE_PATTERN: SIGTERM, wait up to 20 s, SIGKILL.
stop_service() {
  local name="$1" file="$2" pattern="$3" pid
  if ! pid="$(live_pid "$file" "$pattern")"; then
    if [[ -e "$file" ]]; then log "$name: removing stale pid file"; fi
    rm -f "$file"
    log "$name: not running"
    return 0
  fi
  log "$name: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$name: still alive after 20s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f "$file"
  log "$name: stopped"
}

# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

# Fail before starting anything if a port we need is taken by something that
# is not ours (a system Redis, another Kafka, ...): reusing it silently would
# give tests a service with unknown config and data.
preflight_ports() {
  local port
  if ! kafka_pid >/dev/null; then
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
      port_open "$port" &&
        die "port $port is already in use by a process this script did not start (state dir $STATE_DIR); stop it or choose other ports: KAFKA_PORT=... KAFKA_CONTROLLER_PORT=..."
    done
  fi
  if ! redis_pid >/dev/null && port_open "$REDIS_PORT"; then
    if redis_answers "$REDIS_PORT"; then
      die "a Redis this script did not start already listens on 127.0.0.1:$REDIS_PORT (a system service? try 'service redis-server stop'), or use another port: REDIS_PORT=6380 $0 up"
    fi
    die "port $REDIS_PORT is already in use by something else; choose another with REDIS_PORT=..."
  fi
}

# If `up` fails half-way, stop what this invocation started so that the next
# `up` starts from a clean slate instead of adopting a broken service.
cleanup_failed_up() {
  local rc=$?
  ((rc == 0)) && return 0
  # `|| true`: a cleanup hiccup must not mask the original exit status.
  if [[ "$STARTED_KAFKA" == 1 ]]; then stop_service kafka "$KAFKA_PID" "$KAFKA_PROPS" || true; fi
  if [[ "$STARTED_REDIS" == 1 ]]; then stop_service redis "$REDIS_PID" "redis-server" || true; fi
  exit "$rc"
}

cmd_up() {
  local t0
  t0="$(now)"
  require_java
  require_python
  [[ -f "$KAFKA_READY" ]] || die "missing $KAFKA_READY"
  mkdir -p "$STATE_DIR" "$KAFKA_DATA"
  touch "$STATE_MARKER"

  ensure_kafka_libs
  ensure_redis_installed
  preflight_ports
  trap cleanup_failed_up EXIT
  start_kafka            # returns at once; the JVM boots while Redis starts
  start_redis
  wait_kafka

  log "kafka ready on 127.0.0.1:$KAFKA_PORT, redis ready on 127.0.0.1:$REDIS_PORT (state: $STATE_DIR)"
  trap - EXIT
  log "up in $(elapsed_since "$t0")s"
  print_exports "$KAFKA_PORT" "$REDIS_PORT"
}

cmd_down() {
  local purge=0
  case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) die "usage: $0 down [--purge]" ;;
  esac
  if [[ -d "$STATE_DIR" ]]; then
    stop_service kafka "$KAFKA_PID" "$KAFKA_PROPS"
    stop_service redis "$REDIS_PID" "redis-server"
  else
    log "nothing to stop ($STATE_DIR does not exist)"
  fi
  if ((purge)) && [[ -d "$STATE_DIR" ]]; then
    [[ -e "$STATE_MARKER" ]] ||
      die "refusing to purge $STATE_DIR: it has no $(basename "$STATE_MARKER") marker, so this script did not create it"
    rm -rf -- "$STATE_DIR"
    log "purged $STATE_DIR"
  fi
}

cmd_status() {
  local ok=0 pid kport rport
  kport="$(recorded_port "$STATE_DIR/kafka.port" "$KAFKA_PORT")"
  rport="$(recorded_port "$STATE_DIR/redis.port" "$REDIS_PORT")"

  if pid="$(kafka_pid)"; then
    if kafka_answers "$kport"; then
      log "kafka: running (pid $pid, 127.0.0.1:$kport)"
    else
      log "kafka: process $pid alive but not answering on 127.0.0.1:$kport"
      ok=1
    fi
  else
    log "kafka: not running"
    ok=1
  fi

  if pid="$(redis_pid)"; then
    if command -v redis-cli >/dev/null && redis_answers "$rport"; then
      log "redis: running (pid $pid, 127.0.0.1:$rport)"
    else
      log "redis: process $pid alive but not answering PING on 127.0.0.1:$rport"
      ok=1
    fi
  else
    log "redis: not running"
    ok=1
  fi

  if ((ok == 0)); then print_exports "$kport" "$rport"; fi
  return "$ok"
}

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    *) usage ;;
  esac
}

main "$@"
