#!/usr/bin/env bash
# Installs what building and testing MetaStore needs on a fresh Debian/Ubuntu machine that has
# only the Rust toolchain: protoc (tonic/prost code generation), libclang (bindgen for the
# RocksDB engine's librocksdb-sys), etcdctl and python3-etcd3gw (integration tests) and etcd
# itself (the reference server that loadgen's tests and bench/compare.sh run side by side with
# MetaStore).
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
# etcd3gw, a Python client of the JSON gateway (tests/it/gateway.rs).
dpkg -s python3-etcd3gw >/dev/null 2>&1 || need+=(python3-etcd3gw)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Formatting and lint checks run first in the test command.
for component in rustfmt clippy; do
  cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done
