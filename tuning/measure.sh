#!/usr/bin/env bash
# Measures the tuning knobs that can be measured on one machine with loopback networking, and
# prints one markdown table row per setting (the table in tuning/README.md).
#
# Usage: tuning/measure.sh [KNOB ...]        (no argument: every knob)
#   KNOBs: shards engine rocksdb-write-buffer rocksdb-block-cache rocksdb-compression
#          rocksdb-bloom snapshot-count fsync pinning thp swappiness io-scheduler
#
# Each setting gets a fresh single-member node (data dir from mktemp -d, so under $TMPDIR,
# default /tmp), a free loopback port, and one run of:
#   $LOADGEN --endpoints 127.0.0.1:$PORT --clients 100 --conns 10 --total 20000 --output json
#            put --key-size 8 --val-size 256 --key-space-size 100000 --sequential-keys
# Rows go to stdout; progress and skipped knobs go to stderr. Run from the repository root
# (or set METASTORE and LOADGEN).
#
# Environment:
#   METASTORE  server binary      (default target/release/metastore)
#   LOADGEN    load generator     (default target/release/metastore-loadgen)
#   ETCDCTL    etcdctl            (default etcdctl; used for the health check only)
#   TOTAL      requests per run   (default 20000)
#   IO_DEVICE  block device for io-scheduler, e.g. nvme0n1 (default: the disk under $TMPDIR)
#   KEEP_LOGS  1 keeps each server log in the data dir and leaves the data dir behind
#
# Host knobs (thp, swappiness, io-scheduler) need root and a writable /sys or /proc/sys; the
# original value is restored on exit (also on Ctrl-C). ETCD_* and METASTORE_* variables of the
# calling shell are unset so that only the flags below decide the configuration.
set -euo pipefail

METASTORE=${METASTORE:-target/release/metastore}
LOADGEN=${LOADGEN:-target/release/metastore-loadgen}
ETCDCTL=${ETCDCTL:-etcdctl}
TOTAL=${TOTAL:-20000}
KEEP_LOGS=${KEEP_LOGS:-0}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

ALL_KNOBS=(shards engine rocksdb-write-buffer rocksdb-block-cache rocksdb-compression
    rocksdb-bloom snapshot-count fsync pinning thp swappiness io-scheduler)

MiB=$((1024 * 1024))
# Base for the RocksDB table knobs: a 1 MiB memtable makes 20,000 puts flush several SST files
# per shard; with the 64 MiB default nothing reaches an SST file and block cache, compression
# and bloom filters are never used.
ROCKS_SMALL=(--storage-engine rocksdb --rocksdb-write-buffer-bytes "$MiB")

log() { echo "measure: $*" >&2; }
die() { log "$*"; exit 1; }

for v in $(compgen -e); do
    case $v in ETCD_* | METASTORE_*) unset "$v" ;; esac
done

command -v python3 >/dev/null || die "python3 is needed to parse the load generator's JSON"
command -v "$ETCDCTL" >/dev/null || die "etcdctl not found (set ETCDCTL)"
[ -x "$METASTORE" ] || die "no server binary at $METASTORE (set METASTORE)"
[ -x "$LOADGEN" ] || die "no load generator at $LOADGEN (set LOADGEN)"

# Online CPUs, expanded ("0-1" -> "0 1").
read -r -a CPUS <<<"$(python3 - <<'EOF'
out = []
for part in open("/sys/devices/system/cpu/online").read().strip().split(","):
    lo, _, hi = part.partition("-")
    out.extend(range(int(lo), int(hi or lo) + 1))
print(" ".join(map(str, out)))
EOF
)"
NCPU=${#CPUS[@]}

# --- state cleaned up on exit ---------------------------------------------------------------
SERVER_PID=""
DATA_DIR=""
RESTORE=() # "path<TAB>value" pairs written back on exit

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
    if [ -n "$DATA_DIR" ]; then
        if [ "$KEEP_LOGS" = 1 ]; then
            log "kept $DATA_DIR"
        else
            rm -rf "$DATA_DIR"
        fi
        DATA_DIR=""
    fi
}

restore_host() {
    local entry path value
    for entry in "${RESTORE[@]+"${RESTORE[@]}"}"; do
        path=${entry%%$'\t'*}
        value=${entry#*$'\t'}
        if echo "$value" >"$path" 2>/dev/null; then
            log "restored $path = $value"
        else
            log "could not restore $path to $value: do it by hand"
        fi
    done
    RESTORE=()
}

cleanup() {
    stop_server
    restore_host
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- one node, one run ------------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server ARGS...: starts a node with ARGS added to the fixed flags; sets SERVER_PID,
# DATA_DIR and PORT. Returns 1 if the node does not become healthy within 120 s.
start_server() {
    DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/metastore-measure.XXXXXX") || return 1
    PORT=$(free_port) || return 1
    local url="http://127.0.0.1:$PORT"
    "$METASTORE" --name measure --data-dir "$DATA_DIR/data" \
        --listen-client-urls "$url" --advertise-client-urls "$url" \
        "$@" >"$DATA_DIR/server.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + 120))
    until "$ETCDCTL" --endpoints "$url" --dial-timeout 1s --command-timeout 2s \
        endpoint health >/dev/null 2>&1; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server exited during start-up ($*); last lines of its log:"
            tail -n 20 "$DATA_DIR/server.log" >&2 || true
            SERVER_PID=""
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "server not healthy after 120 s ($*)"
            tail -n 20 "$DATA_DIR/server.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

# run_load [PREFIX...]: runs the load generator (PREFIX, e.g. "taskset -c 0", goes before it)
# and prints "REQ_PER_SEC P99_MS".
run_load() {
    local out
    out=$("$@" "$LOADGEN" --endpoints "127.0.0.1:$PORT" --clients 100 --conns 10 \
        --total "$TOTAL" --output json \
        put --key-size 8 --val-size 256 --key-space-size 100000 --sequential-keys) || return 1
    python3 -c '
import json, sys
try:
    r = json.loads(sys.argv[1])
    rps, p99 = float(r["requests_per_sec"]), float(r["latency_ms"]["p99"])
except (ValueError, KeyError, TypeError) as e:
    sys.exit("measure: unexpected load generator output (%r): %.200s" % (e, sys.argv[1]))
if r.get("errors"):
    print("measure: %s failed requests: %s" % (r["errors"], r.get("error_distribution")), file=sys.stderr)
print("%.0f %.2f" % (rps, p99))
' "$out"
}

row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4"; }

# pin_server MODE: re-pins the running server's threads.
#   none         glommio's own placement (shards pinned, everything else floating)
#   split        every server thread on the second CPU (the load generator runs on the first)
#   shard-alone  the shard threads alone on the second CPU; everything else on the first
pin_server() {
    case $1 in
        none) ;;
        split) taskset -a -p -c "${CPUS[1]}" "$SERVER_PID" >/dev/null || return 1 ;;
        shard-alone)
            bash "$HERE/pin-threads.sh" --shard-cpus "${CPUS[1]}" --other-cpus "${CPUS[0]}" \
                "$SERVER_PID" >/dev/null || return 1 ;;
        *) log "unknown pinning mode $1"; return 1 ;;
    esac
}

# measure KNOB SETTING [--pin MODE] [--] SERVER_ARGS...: one table row.
#   --pin none | split | shard-alone (see the pinning knob)
measure() {
    local knob=$1 setting=$2 pin=none
    shift 2
    if [ "${1:-}" = --pin ]; then pin=$2; shift 2; fi
    [ "${1:-}" = -- ] && shift
    log "$knob: $setting"
    local result="" prefix=()
    case $pin in
        none) ;;
        split | shard-alone) prefix=(taskset -c "${CPUS[0]}") ;;
    esac
    if start_server "$@" && pin_server "$pin"; then
        result=$(run_load "${prefix[@]+"${prefix[@]}"}") || result=""
    fi
    stop_server
    if [ -n "$result" ]; then
        row "$knob" "$setting" "${result% *}" "${result#* }"
    else
        row "$knob" "$setting" "failed" "failed"
    fi
}

# set_host PATH VALUE: writes VALUE, remembering the first original value for restore.
set_host() {
    local path=$1 value=$2 entry known=0
    for entry in "${RESTORE[@]+"${RESTORE[@]}"}"; do
        [ "${entry%%$'\t'*}" = "$path" ] && known=1
    done
    if [ "$known" = 0 ]; then
        RESTORE+=("$path"$'\t'"$(current_value "$path")")
    fi
    echo "$value" >"$path"
}

# The selected value of a sysfs choice file ("always [madvise] never" -> madvise), or the
# file's content.
current_value() {
    local v
    v=$(cat "$1")
    if [[ $v =~ \[([^]]+)\] ]]; then echo "${BASH_REMATCH[1]}"; else echo "$v"; fi
}

host_writable() { # path -> 0 if this run can change it, else prints why not
    if [ ! -e "$1" ]; then echo "$1 does not exist"; return 1; fi
    if [ "$(id -u)" != 0 ]; then echo "needs root"; return 1; fi
    if ! (current_value "$1" >"$1") 2>/dev/null; then echo "$1 is not writable"; return 1; fi
}

# --- knobs ------------------------------------------------------------------------------------
knob_shards() {
    measure shards "--shards 1" -- --shards 1
    if [ "$NCPU" -gt 2 ]; then
        measure shards "--shards $((NCPU - 1))" -- --shards $((NCPU - 1))
    fi
    if [ "$NCPU" -gt 1 ]; then
        measure shards "--shards $NCPU (default: online CPUs)" -- --shards "$NCPU"
    fi
}

knob_engine() {
    measure engine "--storage-engine memory (default)" -- --storage-engine memory
    measure engine "--storage-engine rocksdb" -- --storage-engine rocksdb
}

knob_rocksdb_write_buffer() {
    measure rocksdb-write-buffer "64 MiB (default), rocksdb" -- --storage-engine rocksdb
    measure rocksdb-write-buffer "1 MiB, rocksdb" -- "${ROCKS_SMALL[@]}"
}

knob_rocksdb_block_cache() {
    measure rocksdb-block-cache "1 MiB, rocksdb, 1 MiB write buffer" -- \
        "${ROCKS_SMALL[@]}" --rocksdb-block-cache-bytes "$MiB"
    measure rocksdb-block-cache "64 MiB (default), rocksdb, 1 MiB write buffer" -- \
        "${ROCKS_SMALL[@]}"
    measure rocksdb-block-cache "512 MiB, rocksdb, 1 MiB write buffer" -- \
        "${ROCKS_SMALL[@]}" --rocksdb-block-cache-bytes $((512 * MiB))
}

knob_rocksdb_compression() {
    measure rocksdb-compression "lz4 (default), rocksdb, 1 MiB write buffer" -- \
        "${ROCKS_SMALL[@]}"
    measure rocksdb-compression "none, rocksdb, 1 MiB write buffer" -- \
        "${ROCKS_SMALL[@]}" --rocksdb-compression none
}

knob_rocksdb_bloom() {
    measure rocksdb-bloom "10 bits/key (default), rocksdb, 1 MiB write buffer" -- \
        "${ROCKS_SMALL[@]}"
    measure rocksdb-bloom "0 (off), rocksdb, 1 MiB write buffer" -- \
        "${ROCKS_SMALL[@]}" --rocksdb-bloom-bits-per-key 0
}

knob_snapshot_count() {
    measure snapshot-count "100000 (default), memory" -- --snapshot-count 100000
    measure snapshot-count "1000, memory" -- --snapshot-count 1000
    measure snapshot-count "100, memory" -- --snapshot-count 100
    measure snapshot-count "100000 (default), rocksdb" -- \
        --storage-engine rocksdb --snapshot-count 100000
    measure snapshot-count "100, rocksdb" -- --storage-engine rocksdb --snapshot-count 100
}

knob_fsync() {
    measure fsync "on (default)" --
    measure fsync "--unsafe-no-fsync (never in production)" -- --unsafe-no-fsync
}

knob_pinning() {
    if [ "$NCPU" -lt 2 ]; then
        log "skipped pinning: needs 2 CPUs, this host has $NCPU"
        return 0
    fi
    command -v taskset >/dev/null || { log "skipped pinning: taskset not installed"; return 0; }
    local a=${CPUS[0]} b=${CPUS[1]}
    measure pinning "none, --shards 1" --pin none -- --shards 1
    measure pinning "server CPU $b, loadgen CPU $a, --shards 1" --pin split -- --shards 1
    measure pinning "shard CPU $b; grpc/raft/apply + loadgen CPU $a, --shards 1" \
        --pin shard-alone -- --shards 1
}

knob_thp() {
    local f=/sys/kernel/mm/transparent_hugepage/enabled why mode was
    why=$(host_writable "$f") || { log "skipped thp: $why"; return 0; }
    was=$(current_value "$f")
    for mode in always madvise never; do
        set_host "$f" "$mode"
        measure thp "$mode$([ "$mode" = "$was" ] && echo ' (current)')" --
    done
    restore_host
}

knob_swappiness() {
    local f=/proc/sys/vm/swappiness why v was
    why=$(host_writable "$f") || { log "skipped swappiness: $why"; return 0; }
    if [ "$(awk 'NR > 1' /proc/swaps | wc -l)" = 0 ]; then
        log "skipped swappiness: no swap device is active (/proc/swaps is empty), so it changes nothing"
        return 0
    fi
    was=$(cat "$f")
    for v in 1 10 60; do
        set_host "$f" "$v"
        measure swappiness "$v$([ "$v" = "$was" ] && echo ' (current)')" --
    done
    restore_host
}

# The whole disk under a path: /dev/nvme0n1p2 -> nvme0n1, /dev/vda -> vda.
disk_of() {
    local src name
    src=$(findmnt -n -o SOURCE -T "$1" 2>/dev/null | head -n 1) || return 1
    name=$(basename "$src")
    [ -e "/sys/class/block/$name" ] || return 1
    if [ -e "/sys/class/block/$name/partition" ]; then
        name=$(basename "$(dirname "$(readlink -f "/sys/class/block/$name")")")
    fi
    echo "$name"
}

knob_io_scheduler() {
    local dev f why was s available
    dev=${IO_DEVICE:-$(disk_of "${TMPDIR:-/tmp}" || true)}
    if [ -z "$dev" ]; then
        log "skipped io-scheduler: cannot find the disk under ${TMPDIR:-/tmp} (set IO_DEVICE)"
        return 0
    fi
    f=/sys/block/$dev/queue/scheduler
    why=$(host_writable "$f") || { log "skipped io-scheduler: $why"; return 0; }
    available=$(tr -d '[]' <"$f")
    was=$(current_value "$f")
    for s in none mq-deadline bfq; do
        if ! [[ " $available " == *" $s "* ]]; then
            log "io-scheduler: $s is not offered for $dev ($available)"
            continue
        fi
        set_host "$f" "$s"
        measure io-scheduler "$s on $dev$([ "$s" = "$was" ] && echo ' (current)')" --
    done
    restore_host
}

# --- main -------------------------------------------------------------------------------------
knobs=("$@")
[ ${#knobs[@]} -gt 0 ] || knobs=("${ALL_KNOBS[@]}")
for k in "${knobs[@]}"; do
    [[ " ${ALL_KNOBS[*]} " == *" $k "* ]] || die "unknown knob '$k'; knobs: ${ALL_KNOBS[*]}"
done

log "server $METASTORE, load generator $LOADGEN, $NCPU online CPUs (${CPUS[*]}), $TOTAL puts per run"
row knob setting "put 100 clients req/s" "p99 ms"
echo "|---|---|---|---|"
for k in "${knobs[@]}"; do
    "knob_${k//-/_}"
done
