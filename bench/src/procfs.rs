//! What the kernel says about a process: CPU time and memory, from `/proc`.

/// The fields of `/proc/<pid>/stat` after the command name, so that index 0 is field 3
/// (`state`), 1 is `ppid`, 11 `utime`, 12 `stime`, 13 `cutime`, 14 `cstime`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Clock ticks in fields `indices` of `fields`, summed, in seconds.
fn ticks(fields: &[String], indices: &[usize]) -> Option<f64> {
    let mut sum = 0u64;
    for &index in indices {
        sum += fields.get(index)?.parse::<u64>().ok()?;
    }
    Some(sum as f64 / ticks_per_second())
}

/// User + system CPU time of `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    ticks(&stat_fields(pid)?, &[11, 12])
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The command name of `pid` (`/proc/<pid>/comm`).
pub fn command(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|name| name.trim().to_owned())
}

/// CPU time of a server made of one parent process and its children (Postgres: the
/// postmaster and its backends and background workers), in seconds: the parent's own time, the
/// time of its live children, and the time of its children that already exited (the kernel
/// adds a child's time to its parent's `cutime`/`cstime` when the parent reaps it, as the
/// postmaster does). The difference of two readings therefore counts every process of the
/// server, including those that started or ended between them.
pub fn tree_cpu_seconds(root: u32) -> Option<f64> {
    let mut total = ticks(&stat_fields(root)?, &[11, 12, 13, 14])?;
    let root_text = root.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A child may exit between the listing and the read: it is then skipped here, and
        // its time shows up in the parent's `cutime` at the next reading.
        if let Some(fields) = stat_fields(pid)
            && fields.get(1) == Some(&root_text)
        {
            total += ticks(&fields, &[11, 12]).unwrap_or(0.0);
        }
    }
    Some(total)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Resident memory now, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS").map(|kib| kib as f64 / 1024.0)
}

/// Peak resident memory since start, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM").map(|kib| kib as f64 / 1024.0)
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `/proc/loadavg`'s three averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|avg| avg.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert!(rss_mib(pid).is_some_and(|m| m > 0.0));
        assert!(peak_rss_mib(pid).is_some_and(|m| m >= rss_mib(pid).unwrap_or(0.0) - 1.0));
    }

    #[test]
    fn a_process_tree_counts_at_least_its_root() {
        let pid = std::process::id();
        let own = cpu_seconds(pid).unwrap_or(f64::MAX);
        assert!(tree_cpu_seconds(pid).is_some_and(|s| s >= own));
        assert!(parent(pid).is_some_and(|p| p > 0));
        assert!(command(pid).is_some_and(|name| !name.is_empty()));
    }
}
