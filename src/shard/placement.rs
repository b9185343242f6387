//! Placement: which shard owns a key (a pure hash, identical on every replica) and which CPU
//! runs each shard.

use super::SpawnError;

/// The shard that owns `key` among `shards` shards: a pure hash, identical on every replica.
pub fn shard_for(key: &[u8], shards: usize) -> usize {
    crc32fast::hash(key) as usize % shards
}

/// The CPUs shards are pinned to: the online CPUs this process is allowed to run on
/// (`Cpus_allowed_list` in `/proc/self/status`, which reflects `taskset`, `CPUAffinity=` and
/// cpusets), sorted ascending. glommio's own online-CPU set has no stable order and ignores the
/// affinity mask, which made placement differ between starts and could pin a shard to a CPU
/// outside its cpuset.
///
/// Errors: the online CPUs cannot be listed.
pub fn shard_cpus() -> Result<Vec<usize>, SpawnError> {
    let mut online: Vec<usize> = glommio::CpuSet::online()
        .map_err(|e| SpawnError::OnlineCpus(e.to_string()))?
        .into_iter()
        .map(|l| l.cpu)
        .collect();
    online.sort_unstable();
    online.dedup();
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .and_then(|l| parse_cpu_list(l.trim()))
        });
    Ok(match allowed {
        Some(allowed) => {
            let both: Vec<usize> = online
                .iter()
                .copied()
                .filter(|c| allowed.contains(c))
                .collect();
            if both.is_empty() {
                online
            } else {
                both
            }
        }
        None => online,
    })
}

/// Parses a kernel CPU list such as `0-3,8,10-11` into sorted CPU numbers; `None` if malformed.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}
