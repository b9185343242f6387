#!/usr/bin/env bash
# The side-by-side comparison in one command: installs etcd (Debian's etcd-server) if absent
# (through .ci/deps.sh), builds MetaStore, metastore-loadgen and metastore-compare in release
# mode, and runs the comparison, which writes bench/RESULTS.md, bench/results.json and the SVG
# charts.
#
#   bench/compare.sh                       # 3 rounds, full request counts, 1M-key memory test
#   bench/compare.sh --rounds 1 --scale 0.1 --rss-keys 0   # a quick look
#   bench/compare.sh --metastore-args "--storage-engine rocksdb"
#
# Any flag is passed on to metastore-compare (see `metastore-compare --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

.ci/deps.sh
cargo build --release --locked -p metastore -p metastore-loadgen -p metastore-bench --bins
exec target/release/metastore-compare --etcd "$(command -v etcd)" "$@"
