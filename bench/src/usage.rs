//! What `/proc` says a run cost: resident memory of a child, CPU seconds of the bench itself,
//! of the children it has reaped, and of the broker's Erlang VM when its pid is known.

/// Linux reports process CPU times in clock ticks of 1/100 s (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// Resident memory of a running process, from `/proc/<pid>/status`, in MiB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    /// `VmRSS`: resident now.
    pub(crate) rss_mib: f64,
    /// `VmHWM`: the peak so far.
    pub(crate) peak_mib: f64,
}

/// Reads [`Memory`] of `pid`; zeros when the process is gone.
pub(crate) fn memory(pid: u32) -> Memory {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Memory::default();
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    Memory {
        rss_mib: field("VmRSS:"),
        peak_mib: field("VmHWM:"),
    }
}

/// Fields of `/proc/<who>/stat` after the command name, which may hold spaces and ends at
/// the last ')'; empty when the process is gone.
fn stat_fields(who: &str) -> Vec<f64> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{who}/stat")) else {
        return Vec::new();
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Vec::new();
    };
    rest.split_whitespace()
        .map(|t| t.parse::<f64>().unwrap_or(0.0))
        .collect()
}

/// Sum of the given fields (numbered as in `proc(5)`, 1-based over the whole line), seconds.
fn seconds(fields: &[f64], numbers: &[usize]) -> f64 {
    // The first field after the name is field 3 of the whole line.
    numbers
        .iter()
        .map(|n| fields.get(n - 3).copied().unwrap_or(0.0))
        .sum::<f64>()
        / TICKS_PER_SECOND
}

/// User plus system CPU seconds `pid` has used so far; zero when the process is gone.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    seconds(&stat_fields(&pid.to_string()), &[14, 15])
}

/// CPU seconds of this process so far (`utime`, `stime`): the bench's own loops and collector.
pub(crate) fn own_cpu_seconds() -> f64 {
    seconds(&stat_fields("self"), &[14, 15])
}

/// CPU seconds of every child this process has waited for (`cutime`, `cstime`): the difference
/// across one child's run, with no other child reaped meanwhile, is that child's whole CPU.
pub(crate) fn reaped_children_cpu_seconds() -> f64 {
    seconds(&stat_fields("self"), &[16, 17])
}

/// The OS pid of the broker's Erlang VM: `BENCH_BROKER_PID`, or what the local `rabbitmqctl`
/// says; `None` when neither names a local `beam.smp` process (a broker in a container or on
/// another host, for one), and the broker's CPU is then not reported.
pub(crate) fn broker_pid() -> Option<u32> {
    let pid = match std::env::var("BENCH_BROKER_PID") {
        Ok(pid) => pid.trim().parse().ok()?,
        Err(_) => {
            let output = std::process::Command::new("rabbitmqctl")
                .args(["eval", "os:getpid()."])
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())?;
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .trim_matches('"')
                .parse()
                .ok()?
        }
    };
    // Another host's or container's pid may name an unrelated local process.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    comm.trim().starts_with("beam").then_some(pid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_memory_and_cpu() {
        let me = std::process::id();
        assert!(memory(me).peak_mib > 0.0);
        assert!(cpu_seconds(me) >= 0.0);
        assert!(own_cpu_seconds() >= 0.0);
        assert!(reaped_children_cpu_seconds() >= 0.0);
        assert_eq!(memory(u32::MAX).peak_mib, 0.0);
        assert_eq!(cpu_seconds(u32::MAX), 0.0);
    }
}
