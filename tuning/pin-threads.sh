#!/usr/bin/env bash
# Re-pins the threads of a running MetaStore process.
#
# Why this exists: MetaStore pins shard i's glommio executor to the i-th CPU of the process's
# affinity mask (in order), and its front-end threads (grpc, raft, apply) run on that same mask,
# so there is no flag to say "shards on CPUs 2-7, everything else on CPUs 0-1". This script does
# it after start-up with sched_setaffinity
# (taskset -p), thread by thread:
#
#   shard-<i>-<n>   shard i's executor and its glommio helper thread -> i-th CPU of --shard-cpus
#   rocksdb:*       RocksDB flush/compaction threads                 -> --rocksdb-cpus
#                   (default: --other-cpus; they are created on shard 0's thread during
#                   DB::Open and would otherwise inherit shard 0's single CPU)
#   everything else grpc (tokio workers), raft, apply, main          -> --other-cpus
#
# Threads created later inherit the mask of the thread that creates them (tokio's blocking
# threads are started by the grpc workers, so they land on --other-cpus).
#
# Usage:
#   pin-threads.sh [--dry-run] [--wait SECONDS] --shard-cpus LIST --other-cpus LIST
#                  [--rocksdb-cpus LIST] PID
#   LIST is a CPU list as taskset -c takes it: 2-7 or 0,2,4-6.
#
# --wait SECONDS polls until the process has its "raft" thread (spawned after every shard and
# every RocksDB instance exists), for use right after start-up (systemd ExecStartPost=).
# Needs the same user as the process, or CAP_SYS_NICE.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "${1:-2}"
}

dry_run=0
wait_secs=0
shard_cpus=""
other_cpus=""
rocksdb_cpus=""
pid=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --wait) wait_secs=${2:?--wait needs seconds}; shift ;;
        --shard-cpus) shard_cpus=${2:?--shard-cpus needs a CPU list}; shift ;;
        --other-cpus) other_cpus=${2:?--other-cpus needs a CPU list}; shift ;;
        --rocksdb-cpus) rocksdb_cpus=${2:?--rocksdb-cpus needs a CPU list}; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "pin-threads: unknown option $1" >&2; usage 2 ;;
        *) pid=$1 ;;
    esac
    shift
done
[ -n "$pid" ] && [ -n "$shard_cpus" ] && [ -n "$other_cpus" ] || usage 2
rocksdb_cpus=${rocksdb_cpus:-$other_cpus}

# Expands "0-2,5" to "0 1 2 5".
expand_cpus() {
    local part lo hi parts out=()
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
            while [ "$lo" -le "$hi" ]; do out+=("$lo"); lo=$((lo + 1)); done
        elif [[ $part =~ ^[0-9]+$ ]]; then
            out+=("$part")
        else
            echo "pin-threads: bad CPU list: $1" >&2
            return 1
        fi
    done
    echo "${out[*]}"
}

read -r -a shard_list <<<"$(expand_cpus "$shard_cpus")"
expand_cpus "$other_cpus" >/dev/null
expand_cpus "$rocksdb_cpus" >/dev/null
[ "${#shard_list[@]}" -gt 0 ] || { echo "pin-threads: no CPU in --shard-cpus $shard_cpus" >&2; exit 2; }

[ -d "/proc/$pid/task" ] || { echo "pin-threads: no process $pid" >&2; exit 1; }

if [ "$wait_secs" -gt 0 ]; then
    deadline=$((SECONDS + wait_secs))
    until grep -qx raft /proc/"$pid"/task/*/comm 2>/dev/null; do
        [ -d "/proc/$pid" ] || { echo "pin-threads: process $pid exited" >&2; exit 1; }
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "pin-threads: no raft thread in $pid after ${wait_secs}s" >&2
            exit 1
        fi
        sleep 0.2
    done
fi

pin() { # tid comm cpus
    if [ "$dry_run" = 1 ]; then
        printf 'would pin %-8s %-16s -> %s\n' "$1" "$2" "$3"
    elif taskset -p -c "$3" "$1" >/dev/null; then
        printf 'pinned    %-8s %-16s -> %s\n' "$1" "$2" "$3"
    else
        # A thread can exit between listing and pinning; anything else is an error.
        if [ -d "/proc/$pid/task/$1" ]; then return 1; fi
    fi
}

for task in /proc/"$pid"/task/*; do
    tid=${task##*/}
    comm=$(cat "$task/comm" 2>/dev/null) || continue
    if [[ $comm =~ ^shard-([0-9]+)- ]]; then
        i=${BASH_REMATCH[1]}
        pin "$tid" "$comm" "${shard_list[$((i % ${#shard_list[@]}))]}"
    elif [[ $comm == rocksdb:* ]]; then
        pin "$tid" "$comm" "$rocksdb_cpus"
    else
        pin "$tid" "$comm" "$other_cpus"
    fi
done
