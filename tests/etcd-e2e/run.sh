#!/usr/bin/env bash
# Run etcd 3.4.23's own end-to-end suite (tests/e2e of the etcd source) against
# MetaStore or against etcd itself.  See README.md beside this file.
#
# usage: tests/etcd-e2e/run.sh [--server etcd|metastore] [--binary PATH]
#                              [--list FILE | --run REGEX | --all]
#                              [--timeout SECS] [--pass-out FILE] [--server-log] [--build-only]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="${E2E_WORK:-/tmp/etcd-e2e}"

SERVER=metastore
BINARY=""
LIST=""
REGEX=""
ALL=0
TIMEOUT=60
PASS_OUT=""
BUILD_ONLY=0
SERVER_LOG=0

die() { echo "etcd-e2e: error: $*" >&2; exit 2; }
log() { echo "etcd-e2e: $*" >&2; }

usage() {
	sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
	cat <<EOF

  --server S     etcd or metastore (default metastore)
  --binary PATH  server binary (default: metastore -> $REPO/target/release/metastore
                 or target/debug/metastore, whichever is newer; etcd -> /usr/bin/etcd)
  --list FILE    test names, one per line, '#' comments (default: expected-pass.txt
                 for metastore, pass-on-etcd.txt for etcd)
  --run REGEX    every test of the suite whose name matches the (extended) regex
  --all          every test of the suite
  --timeout N    per-test time limit in seconds (default 60)
  --pass-out F   write the names of the tests that passed to F
  --server-log   keep each server's arguments and stderr in logs/<test>.server.log
                 (the suite's own log only says the server exited)
  --build-only   install, fetch, patch and build, then stop
Environment: E2E_WORK (cache dir, default /tmp/etcd-e2e).
EOF
}

while [[ $# -gt 0 ]]; do
	case "$1" in
	--server) SERVER="${2:?}"; shift 2 ;;
	--binary) BINARY="${2:?}"; shift 2 ;;
	--list) LIST="${2:?}"; shift 2 ;;
	--run) REGEX="${2:?}"; shift 2 ;;
	--all) ALL=1; shift ;;
	--timeout) TIMEOUT="${2:?}"; shift 2 ;;
	--pass-out) PASS_OUT="${2:?}"; shift 2 ;;
	--build-only) BUILD_ONLY=1; shift ;;
	--server-log) SERVER_LOG=1; shift ;;
	-h|--help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
case "$SERVER" in etcd|metastore) ;; *) die "--server must be etcd or metastore" ;; esac
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds"
n=0; [[ -n "$LIST" ]] && n=$((n+1)); [[ -n "$REGEX" ]] && n=$((n+1)); [[ $ALL = 1 ]] && n=$((n+1))
[[ $n -le 1 ]] || die "give at most one of --list, --run, --all"

# ---------------------------------------------------------------- 1. packages
APT_UPDATED=0
apt_update_once() {
	if [[ $APT_UPDATED = 0 ]]; then
		log "apt-get update"
		apt-get update -qq >&2
		APT_UPDATED=1
	fi
}

ensure_packages() {
	local missing=()
	command -v go >/dev/null 2>&1 || missing+=(golang-go)
	[[ -d /usr/share/gocode/src/go.etcd.io/etcd ]] || missing+=(golang-etcd-server-dev)
	[[ -x /usr/bin/etcdctl ]] || missing+=(etcd-client)
	command -v curl >/dev/null 2>&1 || missing+=(curl)
	command -v dpkg-source >/dev/null 2>&1 || missing+=(dpkg-dev)
	command -v timeout >/dev/null 2>&1 || missing+=(coreutils)
	if [[ "$SERVER" = etcd && -z "$BINARY" && ! -x /usr/bin/etcd ]]; then missing+=(etcd-server); fi
	if [[ ${#missing[@]} -gt 0 ]]; then
		[[ $(id -u) = 0 ]] || die "missing packages (${missing[*]}) and not root to install them"
		apt_update_once
		log "apt-get install ${missing[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
	fi
}

# Source packages need a deb-src entry.  We never edit the machine's own apt
# files: we add one file of our own that mirrors the Debian 'deb' entries.
ensure_deb_src() {
	if grep -Eqs '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
		/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
		return
	fi
	[[ $(id -u) = 0 ]] || die "no deb-src entry in apt sources and not root to add one"
	local out
	if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
		out=/etc/apt/sources.list.d/etcd-e2e-src.sources
		# deb822: copy each stanza that is a Debian archive, as deb-src.
		awk 'BEGIN{RS="";ORS="\n\n"} /debian\.org|debian-archive-keyring/ {sub(/Types:[^\n]*/,"Types: deb-src"); print}' \
			/etc/apt/sources.list.d/*.sources >"$out"
	fi
	if [[ ! -s "${out:-/nonexistent}" ]]; then
		out=/etc/apt/sources.list.d/etcd-e2e-src.list
		cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' >"$out"
	fi
	[[ -s "$out" ]] || die "could not derive a deb-src entry from the apt sources"
	log "added $out"
	APT_UPDATED=0
	apt_update_once
}

# ------------------------------------------------ 2. source, patch, build once
READY_OLD='	etcdServerReadyLines = []string{"enabled capabilities for version", "published"}'
READY_NEW='	etcdServerReadyLines = []string{"ready to serve client requests"}'

ensure_source() {
	SRC="$(ls -d "$WORK"/src/etcd-3.4.*/ 2>/dev/null | head -1 || true)"
	if [[ -z "$SRC" ]]; then
		ensure_deb_src
		mkdir -p "$WORK/src"
		log "apt-get source etcd"
		(cd "$WORK/src" && apt-get source -qq etcd >&2)
		SRC="$(ls -d "$WORK"/src/etcd-3.4.*/ 2>/dev/null | head -1 || true)"
		[[ -n "$SRC" ]] || die "apt-get source etcd gave no etcd-3.4.* tree in $WORK/src"
	fi
	SRC="${SRC%/}"
	E2E_DIR="$SRC/tests/e2e"
	[[ -f "$E2E_DIR/etcd_process.go" ]] || die "$E2E_DIR/etcd_process.go not found: unexpected source layout"
	local f="$E2E_DIR/etcd_process.go"
	if ! grep -qxF "$READY_NEW" "$f"; then
		grep -qxF "$READY_OLD" "$f" || die "readiness line not found in $f; expected: $READY_OLD"
		sed -i 's|^\tetcdServerReadyLines = \[\]string{"enabled capabilities for version", "published"}$|\tetcdServerReadyLines = []string{"ready to serve client requests"}|' "$f"
		grep -qxF "$READY_NEW" "$f" || die "patching the readiness line in $f failed"
		rm -f "$WORK/e2e.test"   # built from the unpatched file
		log "patched readiness line in $f"
	fi
}

ensure_build() {
	if [[ -x "$WORK/e2e.test" ]]; then return; fi
	# GOPATH mode: the patched tree is go.etcd.io/etcd; every dependency comes
	# from Debian's /usr/share/gocode.
	mkdir -p "$WORK/gopath/src/go.etcd.io"
	ln -sfn "$SRC" "$WORK/gopath/src/go.etcd.io/etcd"
	log "building e2e.test (go test -c, GOPATH mode)"
	local t0=$SECONDS
	GO111MODULE=off GOPATH="$WORK/gopath:/usr/share/gocode" GOCACHE="$WORK/gocache" GOFLAGS=-p=1 \
		nice go test -c -o "$WORK/e2e.test.tmp" go.etcd.io/etcd/tests/e2e >&2
	mv "$WORK/e2e.test.tmp" "$WORK/e2e.test"
	log "built $WORK/e2e.test in $((SECONDS - t0))s"
}

mkdir -p "$WORK"
ensure_packages
ensure_source
ensure_build
if [[ $BUILD_ONLY = 1 ]]; then log "build ready: $WORK/e2e.test"; exit 0; fi

# etcd's suite listens on fixed ports (20000 and up): two runs at once would take each
# other's ports, so a second run waits for the first.
exec 9>"$WORK/run.lock"
if ! flock -n 9; then
	log "another run holds $WORK/run.lock; waiting for it"
	flock 9
fi

# ------------------------------------------------------------ 3. the selection
ALL_TESTS="$("$WORK/e2e.test" -test.list '.*' | grep -E '^(Test|Example)')"
read_list() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$1" | grep -v '^$' || true; }
if [[ -n "$REGEX" ]]; then
	SELECTED="$(grep -E -- "$REGEX" <<<"$ALL_TESTS" || true)"
elif [[ $ALL = 1 ]]; then
	SELECTED="$ALL_TESTS"
else
	if [[ -z "$LIST" ]]; then
		if [[ "$SERVER" = etcd ]]; then LIST="$HERE/pass-on-etcd.txt"; else LIST="$HERE/expected-pass.txt"; fi
	fi
	[[ -f "$LIST" ]] || die "list file $LIST not found"
	SELECTED="$(read_list "$LIST")"
fi

# ---------------------------------------------------------------- the bin dir
if [[ -z "$BINARY" ]]; then
	if [[ "$SERVER" = etcd ]]; then
		BINARY=/usr/bin/etcd
	else
		for b in "$REPO/target/release/metastore" "$REPO/target/debug/metastore"; do
			if [[ -x "$b" && ( -z "$BINARY" || "$b" -nt "$BINARY" ) ]]; then BINARY="$b"; fi
		done
		[[ -n "$BINARY" ]] || die "no metastore binary: run 'cargo build --bin metastore' in $REPO or pass --binary"
	fi
fi
[[ -x "$BINARY" ]] || die "server binary $BINARY is not executable"

RUN_DIR="$(mktemp -d "$WORK/run.XXXXXX")"
BIN="$RUN_DIR/bin"
mkdir -p "$BIN" "$RUN_DIR/logs" "$RUN_DIR/tmp"
# Copies, not links: the binary may be rebuilt during the run, and a process is
# ours exactly when its executable lies in $BIN.
if [[ $SERVER_LOG = 1 ]]; then
	# A wrapper that records the arguments and tees stderr, then execs the
	# real binary (the process keeps its pid, so the harness's signals reach it).
	cp "$BINARY" "$BIN/etcd.real"
	cat >"$BIN/etcd" <<EOF
#!/bin/bash
echo "ARGS: \$*" >>"$RUN_DIR/server.log"
exec "$BIN/etcd.real" "\$@" 2> >(tee -a "$RUN_DIR/server.log" >&2)
EOF
	chmod +x "$BIN/etcd"
else
	cp "$BINARY" "$BIN/etcd"
fi
cp /usr/bin/etcdctl "$BIN/etcdctl"
log "server $SERVER: $BINARY -> $BIN/etcd; logs in $RUN_DIR/logs"

kill_strays() {
	local p exe pids=()
	for p in /proc/[0-9]*; do
		exe="$(readlink "$p/exe" 2>/dev/null || true)"
		case "$exe" in "$BIN"/*) pids+=("${p#/proc/}") ;; esac
	done
	if [[ ${#pids[@]} -gt 0 ]]; then
		kill -9 "${pids[@]}" 2>/dev/null || true
		sleep 0.5
	fi
}
cleanup() { kill_strays; rm -rf "$RUN_DIR/tmp" "$BIN"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ 4. run each test
passed=0; failed=0; skipped=0; retried=""
[[ -n "$PASS_OUT" ]] && : >"$PASS_OUT"
while IFS= read -r name; do
	[[ -n "$name" ]] || continue
	logf="$RUN_DIR/logs/$name.log"
	attempt=1
	while :; do
	kill_strays
	rm -rf "$RUN_DIR/tmp" && mkdir -p "$RUN_DIR/tmp"
	t0=$(date +%s.%N)
	rc=0
	(cd "$E2E_DIR" && TMPDIR="$RUN_DIR/tmp" timeout -k 5 $((TIMEOUT + 15)) \
		"$WORK/e2e.test" -test.v -test.run "^${name}\$" -test.timeout "${TIMEOUT}s" \
		-bin-dir "$BIN" -cert-dir "$SRC/integration/fixtures") >"$logf" 2>&1 </dev/null || rc=$?
	secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
	kill_strays
	if [[ -f "$RUN_DIR/server.log" ]]; then mv "$RUN_DIR/server.log" "$RUN_DIR/logs/$name.server.log"; fi
	if ! grep -q "^=== RUN   ${name}\$" "$logf"; then
		status=FAIL; echo "no such test" >>"$logf"
	elif [[ $rc = 124 || $rc = 137 ]] || grep -q '^panic: test timed out after' "$logf"; then
		status=TIMEOUT
	elif [[ $rc = 0 ]] && grep -q "^--- SKIP: ${name} " "$logf"; then
		status=SKIP
	elif [[ $rc = 0 ]] && grep -q "^--- PASS: ${name} " "$logf"; then
		status=PASS
	else
		status=FAIL
	fi
	# Two failures of the harness itself, not of a check on the server's answers, run the
	# test once more; a second failure counts:
	# - etcd's `testutil.AfterTest` fails a test whose own checks passed when one of the
	#   harness's pty readers is still running as it counts goroutines (a child process
	#   closing a moment late);
	# - the harness's read of a child's terminal fails with EIO when the child exits before
	#   all its output was read, and the rest of the output is lost ("read /dev/ptmx:
	#   input/output error", etcd issue #9509, seen on etcd's own CI).
	if [[ $status = FAIL && $attempt = 1 ]] && { { grep -q "^--- PASS: ${name} " "$logf" &&
		grep -q "^Too many goroutines running after all test(s)" "$logf"; } ||
		grep -q "read /dev/ptmx: input/output error" "$logf"; }; then
		mv "$logf" "$logf.first"
		attempt=2
		retried="$retried $name"
		continue
	fi
	break
	done
	case $status in
	PASS) passed=$((passed + 1)); [[ -n "$PASS_OUT" ]] && echo "$name" >>"$PASS_OUT" ;;
	SKIP) skipped=$((skipped + 1)) ;;
	*) failed=$((failed + 1)) ;;
	esac
	echo "$status $name ${secs}s"
done <<<"$SELECTED"

[[ $skipped -gt 0 ]] && echo "e2e: $skipped skipped (counted neither passed nor failed)"
[[ -n "$retried" ]] && echo "e2e: run again after the harness alone failed them:$retried"
echo "logs: $RUN_DIR/logs"
echo "e2e: $passed passed, $failed failed"
[[ $failed = 0 ]]
