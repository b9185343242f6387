#!/usr/bin/env bash
# Applies the host settings recommended in tuning/README.md to a bare-metal MetaStore host.
# Run as root. Idempotent: a setting that already has the wanted value is left alone. A knob
# the host does not have (no cpufreq driver, no THP, no such disk, a scheduler the kernel does
# not offer) is reported and skipped; nothing else is touched.
#
# Usage: host-setup.sh [options]
#   --dry-run                  print what would change, change nothing (no root needed)
#   --governor NAME            CPU frequency governor for every CPU (default: performance)
#   --no-governor              leave the governor alone
#   --cstate-max-latency-us N  disable idle states whose exit latency is above N us
#                              (default: leave idle states alone)
#   --thp MODE                 transparent_hugepage/enabled: madvise|never|always
#                              (default: madvise; defrag is set to madvise as well)
#   --swappiness N             vm.swappiness (default: 1)
#   --device DEV               a disk holding the data dir or the WAL (nvme0n1, sda, or a
#                              partition such as nvme0n1p2); repeatable
#   --scheduler S              I/O scheduler for every --device: auto|none|mq-deadline|bfq|kyber
#                              (default: auto = none for non-rotational disks, mq-deadline for
#                              rotational ones)
#   --limits-user USER         write /etc/security/limits.d/90-metastore.conf (nofile 65536,
#                              memlock unlimited) for USER; only matters for processes started
#                              from a login session: systemd units use LimitNOFILE=/LimitMEMLOCK=
#   --persist                  also make swappiness and the I/O scheduler survive a reboot
#                              (/etc/sysctl.d, /etc/udev/rules.d) and print the kernel
#                              command line for the governor and THP
#
# Exit status: 0 when every requested setting is in place or was skipped as absent, 1 when a
# write failed, 2 on a usage error.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "${1:-2}"
}

dry_run=0
governor=performance
cstate_latency=""
thp=madvise
swappiness=1
devices=()
scheduler=auto
limits_user=""
persist=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --governor) governor=${2:?--governor needs a name}; shift ;;
        --no-governor) governor="" ;;
        --cstate-max-latency-us) cstate_latency=${2:?needs microseconds}; shift ;;
        --thp) thp=${2:?--thp needs a mode}; shift ;;
        --swappiness) swappiness=${2:?--swappiness needs a value}; shift ;;
        --device) devices+=("${2:?--device needs a name}"); shift ;;
        --scheduler) scheduler=${2:?--scheduler needs a name}; shift ;;
        --limits-user) limits_user=${2:?--limits-user needs a user}; shift ;;
        --persist) persist=1 ;;
        -h | --help) usage 0 ;;
        *) echo "host-setup: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done
case $thp in madvise | never | always) ;; *) echo "host-setup: --thp must be madvise, never or always" >&2; exit 2 ;; esac
case $scheduler in auto | none | mq-deadline | bfq | kyber) ;; *) echo "host-setup: unknown --scheduler $scheduler" >&2; exit 2 ;; esac
[[ $swappiness =~ ^[0-9]+$ ]] && [ "$swappiness" -le 200 ] || { echo "host-setup: --swappiness must be 0..200" >&2; exit 2; }
[ -z "$cstate_latency" ] || [[ $cstate_latency =~ ^[0-9]+$ ]] || { echo "host-setup: --cstate-max-latency-us must be a number" >&2; exit 2; }

if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "host-setup: changing these settings needs root; run it as root, or with --dry-run to see what would change" >&2
    exit 1
fi

failed=0
say() { printf '%-10s %s\n' "$1" "$2"; }
skip() { say skip "$1"; }

# The selected value of a sysfs choice file ("always [madvise] never" -> madvise), or the
# file's content.
current_value() {
    local v
    v=$(cat "$1")
    if [[ $v =~ \[([^]]+)\] ]]; then echo "${BASH_REMATCH[1]}"; else echo "$v"; fi
}

# set_value PATH VALUE LABEL
set_value() {
    local path=$1 value=$2 label=$3 cur
    cur=$(current_value "$path")
    if [ "$cur" = "$value" ]; then
        say ok "$label: already $value"
    elif [ "$dry_run" = 1 ]; then
        say "would set" "$label: $cur -> $value"
    elif (echo "$value" >"$path") 2>/dev/null && [ "$(current_value "$path")" = "$value" ]; then
        say set "$label: $cur -> $value"
    else
        say failed "$label: could not write $value to $path (read-only, or refused by the kernel)"
        failed=1
    fi
}

# write_file PATH CONTENT: creates or replaces a configuration file when its content differs.
write_file() {
    local path=$1 content=$2
    if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
        say ok "$path: up to date"
    elif [ "$dry_run" = 1 ]; then
        say "would write" "$path:"
        printf '%s\n' "$content" | sed 's/^/    /'
    elif mkdir -p "$(dirname "$path")" && printf '%s\n' "$content" >"$path"; then
        say wrote "$path"
    else
        say failed "could not write $path"
        failed=1
    fi
}

# --- CPU frequency governor -------------------------------------------------------------------
if [ -n "$governor" ]; then
    shopt -s nullglob
    freq_dirs=(/sys/devices/system/cpu/cpu[0-9]*/cpufreq)
    shopt -u nullglob
    if [ ${#freq_dirs[@]} = 0 ]; then
        skip "governor: no cpufreq driver is exposed (/sys/devices/system/cpu/cpu0/cpufreq is missing; typical in VMs, or frequency is managed by firmware)"
    else
        for d in "${freq_dirs[@]}"; do
            cpu=$(basename "$(dirname "$d")")
            if [ ! -e "$d/scaling_governor" ]; then
                skip "governor $cpu: no scaling_governor"
            elif ! grep -qw -- "$governor" "$d/scaling_available_governors" 2>/dev/null; then
                skip "governor $cpu: '$governor' is not offered (available: $(cat "$d/scaling_available_governors" 2>/dev/null || echo unknown))"
            else
                set_value "$d/scaling_governor" "$governor" "governor $cpu"
            fi
        done
    fi
fi

# --- idle states ------------------------------------------------------------------------------
if [ -n "$cstate_latency" ]; then
    shopt -s nullglob
    states=(/sys/devices/system/cpu/cpu[0-9]*/cpuidle/state[0-9]*)
    shopt -u nullglob
    if [ ${#states[@]} = 0 ]; then
        skip "idle states: no cpuidle driver is exposed (/sys/devices/system/cpu/cpu0/cpuidle is missing)"
    else
        for s in "${states[@]}"; do
            lat=$(cat "$s/latency")
            [ "$lat" -gt "$cstate_latency" ] || continue
            cpu=$(basename "$(dirname "$(dirname "$s")")")
            set_value "$s/disable" 1 "idle state $cpu/$(cat "$s/name") (exit latency ${lat} us)"
        done
    fi
fi

# --- transparent huge pages -------------------------------------------------------------------
thp_dir=/sys/kernel/mm/transparent_hugepage
if [ ! -e "$thp_dir/enabled" ]; then
    skip "transparent huge pages: $thp_dir is missing (kernel built without THP)"
else
    if grep -qw -- "$thp" "$thp_dir/enabled"; then
        set_value "$thp_dir/enabled" "$thp" "THP enabled"
    else
        skip "THP enabled: '$thp' is not offered ($(cat "$thp_dir/enabled"))"
    fi
    if [ -e "$thp_dir/defrag" ] && grep -qw madvise "$thp_dir/defrag"; then
        set_value "$thp_dir/defrag" madvise "THP defrag"
    fi
fi

# --- swappiness -------------------------------------------------------------------------------
if [ ! -e /proc/sys/vm/swappiness ]; then
    skip "vm.swappiness: /proc/sys/vm/swappiness is missing"
else
    set_value /proc/sys/vm/swappiness "$swappiness" "vm.swappiness"
    if [ "$(awk 'NR > 1' /proc/swaps | wc -l)" = 0 ]; then
        say note "vm.swappiness: no swap device is active, so the value has no effect until one is"
    fi
    if [ "$persist" = 1 ]; then
        write_file /etc/sysctl.d/90-metastore.conf "# Written by MetaStore's tuning/host-setup.sh
vm.swappiness = $swappiness"
    fi
fi

# --- I/O scheduler ----------------------------------------------------------------------------
udev_rules=()
if [ ${#devices[@]} = 0 ]; then
    skip "I/O scheduler: no --device given (name the disks that hold the data dir and the WAL)"
fi
for dev in "${devices[@]+"${devices[@]}"}"; do
    name=${dev#/dev/}
    if [ ! -e "/sys/class/block/$name" ]; then
        skip "I/O scheduler $name: no such block device"
        continue
    fi
    if [ -e "/sys/class/block/$name/partition" ]; then
        disk=$(basename "$(dirname "$(readlink -f "/sys/class/block/$name")")")
        say note "$name is a partition of $disk: the scheduler is set on $disk"
        name=$disk
    fi
    f=/sys/block/$name/queue/scheduler
    if [ ! -e "$f" ]; then
        skip "I/O scheduler $name: $f is missing"
        continue
    fi
    available=$(tr -d '[]' <"$f")
    want=$scheduler
    if [ "$want" = auto ]; then
        if [ "$(cat "/sys/block/$name/queue/rotational")" = 1 ]; then want=mq-deadline; else want=none; fi
    fi
    if [[ $name == dm-* || $name == md* ]] && [ "$available" = none ]; then
        skip "I/O scheduler $name: device-mapper/md devices queue nothing themselves; set it on the member disks ($(ls "/sys/block/$name/slaves" 2>/dev/null | tr '\n' ' '))"
        continue
    fi
    if ! [[ " $available " == *" $want "* ]]; then
        skip "I/O scheduler $name: '$want' is not offered by this kernel (available: $available; bfq and kyber may need modprobe)"
        continue
    fi
    set_value "$f" "$want" "I/O scheduler $name"
    udev_rules+=("ACTION==\"add|change\", KERNEL==\"$name\", ATTR{queue/scheduler}=\"$want\"")
    if [ "$(cat "/sys/block/$name/queue/write_cache" 2>/dev/null)" = "write back" ]; then
        say note "$name has a volatile write cache (write back): fdatasync issues a cache flush, so keep barriers on; a drive with power-loss protection makes the flush cheap"
    fi
done
if [ "$persist" = 1 ] && [ ${#udev_rules[@]} -gt 0 ]; then
    write_file /etc/udev/rules.d/60-metastore-iosched.rules "# Written by MetaStore's tuning/host-setup.sh
$(printf '%s\n' "${udev_rules[@]}")"
    say note "kernel names (nvme0n1, sda) can change between boots; match on ENV{ID_SERIAL} in the rule if they do"
fi

# --- limits -----------------------------------------------------------------------------------
nr_open=$(cat /proc/sys/fs/nr_open)
if [ "$nr_open" -lt 65536 ]; then
    say note "fs.nr_open is $nr_open: no process can have more open files than that; raise it (sysctl fs.nr_open=1048576) before LimitNOFILE=65536"
fi
if [ -n "$limits_user" ]; then
    if ! id "$limits_user" >/dev/null 2>&1; then
        skip "limits: no user $limits_user"
    elif [ ! -d /etc/security/limits.d ] && [ ! -e /etc/security/limits.conf ]; then
        skip "limits: /etc/security/limits.d is missing (pam_limits not installed)"
    else
        write_file /etc/security/limits.d/90-metastore.conf "# Written by MetaStore's tuning/host-setup.sh (login sessions; systemd units use LimitNOFILE=/LimitMEMLOCK=)
$limits_user soft nofile 65536
$limits_user hard nofile 65536
$limits_user soft memlock unlimited
$limits_user hard memlock unlimited"
    fi
fi

# --- reboot persistence for sysfs-only knobs ----------------------------------------------------
if [ "$persist" = 1 ]; then
    args=()
    [ -n "$governor" ] && [ -e /sys/devices/system/cpu/cpu0/cpufreq ] && args+=("cpufreq.default_governor=$governor")
    [ -e "$thp_dir/enabled" ] && args+=("transparent_hugepage=$thp")
    if [ ${#args[@]} -gt 0 ]; then
        say note "governor and THP are not kept across reboots by this script; add to the kernel command line: ${args[*]}"
    fi
fi

exit "$failed"
