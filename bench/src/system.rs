//! The system under test: the real `producer` and `consumer` binaries as child processes,
//! configured only through their documented environment variables, and what `/proc` says
//! of their memory and CPU.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use shared::topology::QueueType;
use tokio::process::{Child, Command};

/// Linux reports process CPU times in clock ticks of 1/100 s (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// Where the binaries are, and how every child reaches the broker.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Checks that `producer` and `consumer` exist in `dir`.
    ///
    /// # Errors
    /// Says how to build them when they are missing.
    pub(crate) fn find(dir: &Path) -> anyhow::Result<Self> {
        for name in ["producer", "consumer"] {
            if !dir.join(name).is_file() {
                bail!(
                    "{} not found; build the binaries first: cargo build --release -p producer -p consumer (or run scripts/bench.sh)",
                    dir.join(name).display()
                );
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn command(&self, name: &str, env: &Env<'_>) -> Command {
        let mut command = Command::new(self.dir.join(name));
        command
            .env("AMQP_URL", env.amqp_url)
            .env("JOBS_NAMESPACE", env.namespace)
            .env("JOBS_QUEUE_TYPE", env.queue_type.as_str())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Starts one consumer process with `concurrency` workers and `prefetch`.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub(crate) fn consumer(
        &self,
        env: &Env<'_>,
        concurrency: usize,
        prefetch: u16,
    ) -> anyhow::Result<Child> {
        self.command("consumer", env)
            .env("CONSUMER_CONCURRENCY", concurrency.to_string())
            .env("CONSUMER_PREFETCH", prefetch.to_string())
            .env("CONSUMER_HTTP_ADDR", "127.0.0.1:0")
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start consumer")
    }

    /// Runs the producer to completion and returns its confirmed publish rate, from its summary.
    ///
    /// # Errors
    /// When it fails, or not every job was confirmed.
    pub(crate) async fn produce(
        &self,
        env: &Env<'_>,
        jobs: u64,
        size: usize,
        window: usize,
        rate: Option<f64>,
    ) -> anyhow::Result<f64> {
        let mut command = self.command("producer", env);
        command
            .args(["--count", &jobs.to_string()])
            .args(["--size", &size.to_string()])
            .args(["--window", &window.to_string()])
            .stderr(Stdio::piped());
        if let Some(rate) = rate {
            command.args(["--rate", &format!("{rate:.1}")]);
        }
        let output = command.output().await.context("cannot run producer")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("producer failed ({}): {stderr}", output.status);
        }
        summary_rate(&stderr)
            .with_context(|| format!("no summary in the producer's output: {stderr}"))
    }
}

/// The environment every child shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Env<'a> {
    pub(crate) amqp_url: &'a str,
    pub(crate) namespace: &'a str,
    pub(crate) queue_type: QueueType,
}

/// The rate from the producer's summary line: `sent N, confirmed N, failed 0, elapsed 1.234s, 7445 jobs/s`.
fn summary_rate(stderr: &str) -> Option<f64> {
    let line = stderr.lines().rev().find(|l| l.starts_with("sent "))?;
    let confirmed: f64 = line
        .split(", ")
        .find_map(|part| part.strip_prefix("confirmed "))?
        .parse()
        .ok()?;
    let elapsed: f64 = line
        .split(", ")
        .find_map(|part| part.strip_prefix("elapsed "))?
        .trim_end_matches('s')
        .parse()
        .ok()?;
    (elapsed > 0.0).then(|| confirmed / elapsed)
}

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

/// User plus system CPU seconds `pid` has used so far; zero when the process is gone.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|t| t.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS_PER_SECOND
}

/// Stops a consumer with SIGTERM, as compose would, and waits up to `timeout` for it to exit;
/// then kills it.
pub(crate) async fn stop(mut child: Child, timeout: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_producer_summary() {
        let out =
            "WARN something\nsent 10000, confirmed 10000, failed 0, elapsed 2.000s, 5000 jobs/s\n";
        assert_eq!(summary_rate(out), Some(5000.0));
        assert_eq!(summary_rate("nothing"), None);
    }

    #[test]
    fn reads_its_own_memory_and_cpu() {
        let me = std::process::id();
        assert!(memory(me).peak_mib > 0.0);
        assert!(cpu_seconds(me) >= 0.0);
        assert_eq!(memory(u32::MAX).peak_mib, 0.0);
    }
}
