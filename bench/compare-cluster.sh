#!/usr/bin/env bash
# Three members against three members: a MetaStore cluster, then an etcd cluster, on the same
# loopback ports, one after the other, driven by the same metastore-loadgen runs. Prints a
# table of throughput and latency (and the ratio MetaStore / etcd); each run's JSON report is
# kept in the output directory.
#
#   bench/compare-cluster.sh [OUTDIR]          # default: target/compare-cluster
#   METASTORE_ARGS="--storage-engine rocksdb" bench/compare-cluster.sh
#
# Writes go to the leader (--target-leader); reads are spread over all three members. The
# server CPU per request is the user + system CPU time of all three member processes
# (/proc/<pid>/stat) during the workload, divided by the requests answered.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-cluster}
mkdir -p "$OUT"
.ci/deps.sh
cargo build --release --locked -p metastore -p metastore-loadgen --bins
MS=target/release/metastore
LG=target/release/metastore-loadgen
DATA=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$DATA"' EXIT

ALL=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
CLUSTER=n1=http://127.0.0.1:23801,n2=http://127.0.0.1:23802,n3=http://127.0.0.1:23803

start_cluster() { # metastore|etcd
  rm -rf "${DATA:?}"/*
  PIDS=()
  for i in 1 2 3; do
    local args=(--name "n$i" --data-dir "$DATA/n$i"
      --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i"
      --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i"
      --initial-cluster "$CLUSTER" --initial-cluster-state new)
    if [ "$1" = metastore ]; then
      # shellcheck disable=SC2086
      "$MS" "${args[@]}" ${METASTORE_ARGS:-} >"$DATA/n$i.log" 2>&1 &
    else
      etcd "${args[@]}" --log-level error >"$DATA/n$i.log" 2>&1 &
    fi
    PIDS+=($!)
  done
  for _ in $(seq 1 150); do
    ETCDCTL_API=3 etcdctl --endpoints "$ALL" endpoint health >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "$1 cluster did not come up" >&2
  exit 1
}

stop_cluster() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
}

WORKLOADS=(
  "put-1:--target-leader --conns 1 --clients 1 --total 3000 put --key-size 8 --val-size 256"
  "put-64:--target-leader --conns 8 --clients 64 --total 40000 put --key-size 8 --val-size 256"
  "range-l-64:--conns 8 --clients 64 --total 40000 range foo --consistency l"
  "range-s-64:--conns 8 --clients 64 --total 40000 range foo --consistency s"
)
# User + system CPU time of the running members, in clock ticks.
cluster_ticks() {
  local total=0 pid fields
  for pid in "${PIDS[@]}"; do
    # Fields 14 and 15 (utime, stime), counted after the ") " that ends the command name.
    read -r -a fields <<<"$(sed 's/.*) //' "/proc/$pid/stat")"
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}

for server in metastore etcd; do
  start_cluster "$server"
  for w in "${WORKLOADS[@]}"; do
    name=${w%%:*}
    before=$(cluster_ticks)
    # shellcheck disable=SC2086
    "$LG" --endpoints "$ALL" --output json ${w#*:} >"$OUT/$server-$name.json"
    echo $(($(cluster_ticks) - before)) >"$OUT/$server-$name.ticks"
  done
  stop_cluster
done

python3 - "$OUT" "$(getconf CLK_TCK)" "${WORKLOADS[@]}" <<'PY'
import json, sys
out, tck = sys.argv[1], int(sys.argv[2])
workloads = [w.split(":")[0] for w in sys.argv[3:]]
print("| workload | etcd req/s | MetaStore req/s | ratio | etcd p50 / p99 ms "
      "| MetaStore p50 / p99 ms | etcd CPU us/req | MetaStore CPU us/req | etcd / MetaStore CPU |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for w in workloads:
    e = json.load(open(f"{out}/etcd-{w}.json"))
    m = json.load(open(f"{out}/metastore-{w}.json"))
    lat = lambda r: f"{r['latency_ms']['p50']:.2f} / {r['latency_ms']['p99']:.2f}"
    cpu = lambda s, r: int(open(f"{out}/{s}-{w}.ticks").read()) * 1e6 / tck / max(r["count"], 1)
    ce, cm = cpu("etcd", e), cpu("metastore", m)
    print(f"| {w} | {e['requests_per_sec']:.0f} | {m['requests_per_sec']:.0f} | "
          f"{m['requests_per_sec'] / e['requests_per_sec']:.2f}x | {lat(e)} | {lat(m)} | "
          f"{ce:.0f} | {cm:.0f} | {ce / cm if cm else 0:.2f}x |")
PY
