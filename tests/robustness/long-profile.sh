#!/usr/bin/env bash
# Runs the robustness suite's long profile on both engines and writes a report.
#
#   tests/robustness/long-profile.sh [SECONDS_PER_PROFILE] [REPORT]
#
# SECONDS_PER_PROFILE defaults to 600 (each profile, each engine); REPORT defaults to
# target/robustness-report.md. The report has one row per profile and engine: operations,
# faults injected by kind, violations, acknowledged writes lost and member panics, then the
# profile's own summary lines verbatim. The script fails when the run fails (any violation,
# lost write or panic fails the test it comes from).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-600}
report=${2:-target/robustness-report.md}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

started=$(date -u +%FT%TZ)
t0=$(date +%s)
set +e
ROBUSTNESS_SECONDS=$seconds ROBUSTNESS_ENGINES=memory,rocksdb \
    cargo test --features failpoints --test robustness -- --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - t0 ))

# `key=value` out of a summary line (the value ends at a space or parenthesis).
field() { grep -o "[ (]$2=[^ (]*" <<<"$1" | head -1 | cut -d= -f2 | sed "s/[:,]$//"; }
# The faults of a summary line, by kind.
faults() {
    local kinds="" k
    for k in kill+restart leader-stop partition link crash-at-failpoint full-disk damaged; do
        kinds+="${kinds:+, }$k $(field "$1" "$k")"
    done
    echo "$(field "$1" faults) ($kinds)"
}

{
    echo "# Robustness: long profile report"
    echo
    echo "Run started $started on $(hostname) ($(nproc) cores, $(uname -r)), commit" \
         "$(git rev-parse --short HEAD)$(git diff --quiet || echo ' plus uncommitted changes'), debug build" \
         "with \`--features failpoints\`; $seconds s per profile and engine; $elapsed s in all;" \
         "cargo test exit status $status."
    echo
    echo "| profile | engine | operations | final revision | faults | violations | acknowledged writes lost | panics |"
    echo "|---|---|---:|---:|---|---:|---:|---:|"
    grep 'robustness engine=' "$log" | while IFS= read -r line; do
        profile=etcd-like
        [[ $line == kubernetes-like* ]] && profile=kubernetes-like
        echo "| $profile | $(field "$line" engine) | $(field "$line" operations) |" \
             "$(field "$line" revision) | $(faults "$line") |" \
             "$(field "$line" violations) | $(field "$line" lost-writes) | $(field "$line" panics) |"
    done
    echo
    echo "Summary lines as printed:"
    echo
    echo '```'
    grep -E 'robustness engine=|^test result|^  ' "$log" || true
    echo '```'
} >"$report"
echo "report written to $report"
exit "$status"
