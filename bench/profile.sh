#!/usr/bin/env bash
# A perf profile of one MetaStore member under one standard workload, kept as text so the next
# person sees where the server's time went (issue 17: "a perf profile per workload in bench/").
#
#   bench/profile.sh NAME [LOADGEN ARGS...]
#   bench/profile.sh put-100 --clients 100 --conns 10 --total 100000 put --key-size 8 \
#       --val-size 256 --key-space-size 100000 --sequential-keys
#
# Starts a fresh member (METASTORE, default target/release/metastore; METASTORE_ARGS adds
# flags), records `perf record -g` on it while metastore-loadgen runs the workload, and writes
# bench/profiles/NAME.txt: the loadgen summary, the share of samples per thread and
# kernel/user, and the hottest symbols of the whole server. Needs `perf` and a release build.
#
# GRPC_FLOOR=1 profiles the gRPC floor instead (target/release/metastore-grpc-floor, one
# current-thread runtime per CPU; Put and Range only): the gRPC stack with no work behind it.
# DURABLE_FLOOR=1 profiles the durable floor: the same, with each Put group-committed to a file
# with fdatasync before its answer (a millisecond's group wait under load), and single-key
# watches served. FLOOR_RUNTIME picks the floor's layout (default per-core; glommio serves tonic
# on glommio executors, bench/README.md step 20).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1
shift
MS=${METASTORE:-target/release/metastore}
LG=${LOADGEN:-target/release/metastore-loadgen}
OUT=bench/profiles/$NAME.txt
DATA=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$DATA"' EXIT
mkdir -p bench/profiles

if [ -n "${GRPC_FLOOR:-}${DURABLE_FLOOR:-}" ]; then
  MS=target/release/metastore-grpc-floor
  FLOOR_ARGS="--runtime ${FLOOR_RUNTIME:-per-core} --workers $(nproc)"
  if [ -n "${DURABLE_FLOOR:-}" ]; then
    FLOOR_ARGS="$FLOOR_ARGS --wal-dir $DATA/wal --group-wait-ms 1"
  fi
  # shellcheck disable=SC2086
  "$MS" --listen 127.0.0.1:23790 $FLOOR_ARGS >"$DATA/member.log" 2>&1 &
  READY="listening on"
  SERVER="metastore-grpc-floor ${FLOOR_ARGS//$DATA/<tmp>} (at $(git rev-parse --short HEAD))"
else
  # shellcheck disable=SC2086
  "$MS" --data-dir "$DATA/member" --listen-client-urls http://127.0.0.1:23790 \
    --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
    ${METASTORE_ARGS:-} >"$DATA/member.log" 2>&1 &
  READY="ready to serve client requests"
  SERVER="$(basename "$MS") $("$MS" --version | grep -m1 'Git SHA') ${METASTORE_ARGS:-}"
fi
PID=$!
for _ in $(seq 1 100); do
  grep -q "$READY" "$DATA/member.log" && break
  sleep 0.1
done
grep -q "$READY" "$DATA/member.log" || {
  echo "the member did not start:" >&2
  cat "$DATA/member.log" >&2
  exit 1
}

perf record -g -o "$DATA/perf.data" -p "$PID" >/dev/null 2>&1 &
PERF=$!
sleep 0.5
"$LG" --endpoints http://127.0.0.1:23790 "$@" >"$DATA/loadgen.txt" 2>&1
kill -INT "$PERF"
wait "$PERF" || true

report() {
  perf report -i "$DATA/perf.data" --no-children -g none --percent-limit 0.3 "$@" 2>/dev/null |
    grep -v '^#' | grep -v '^$'
}
{
  echo "# perf profile: $NAME"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo "- Server: $SERVER"
  echo "- Workload: metastore-loadgen $*"
  echo "- Recorded with: perf record -g -p <server pid> for the whole workload"
  echo
  echo "## Load generator summary"
  echo
  grep -E "Total:|Requests/sec|Average|50% in|99% in" "$DATA/loadgen.txt" | head -8
  echo
  echo "## Samples by thread and by kernel or user space"
  echo
  report --sort comm,dso
  echo
  echo "## Hottest symbols ([k] kernel, [.] user)"
  echo
  report --sort sym | head -40
} >"$OUT"
echo "wrote $OUT"
