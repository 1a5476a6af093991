//! The system under test: the real `producer` and `consumer` binaries as child processes,
//! configured only through their documented environment variables, at their defaults unless a
//! row says otherwise.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use shared::topology::QueueType;
use tokio::process::{Child, Command};

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

    /// Starts one consumer process; `concurrency` and `prefetch` are its defaults when `None`.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub(crate) fn consumer(
        &self,
        env: &Env<'_>,
        concurrency: Option<usize>,
        prefetch: Option<u16>,
    ) -> anyhow::Result<Child> {
        let mut command = self.command("consumer", env);
        if let Some(concurrency) = concurrency {
            command.env("CONSUMER_CONCURRENCY", concurrency.to_string());
        }
        if let Some(prefetch) = prefetch {
            command.env("CONSUMER_PREFETCH", prefetch.to_string());
        }
        command
            .env("CONSUMER_HTTP_ADDR", "127.0.0.1:0")
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start consumer")
    }

    /// Runs the producer to completion at its default window, as a user would type it
    /// (`producer --count N --size S [--rate R] [--wait]`), and returns its confirmed publish
    /// rate from its summary and how long the whole command took.
    ///
    /// # Errors
    /// When it fails, not every job was confirmed, or (with `wait`) a result is missing.
    pub(crate) async fn produce(
        &self,
        env: &Env<'_>,
        jobs: u64,
        size: usize,
        rate: Option<f64>,
        wait: bool,
    ) -> anyhow::Result<(f64, Duration)> {
        let mut command = self.command("producer", env);
        command
            .args(["--count", &jobs.to_string()])
            .args(["--size", &size.to_string()])
            .stderr(Stdio::piped());
        if let Some(rate) = rate {
            command.args(["--rate", &format!("{rate:.1}")]);
        }
        if wait {
            command.arg("--wait");
        }
        let started = tokio::time::Instant::now();
        let output = command.output().await.context("cannot run producer")?;
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("producer failed ({}): {stderr}", output.status);
        }
        let rate = summary_rate(&stderr)
            .with_context(|| format!("no summary in the producer's output: {stderr}"))?;
        Ok((rate, took))
    }
}

impl Binaries {
    /// Runs `producer --kind <kind> --input <input> --wait` to completion and returns how long
    /// it took.
    ///
    /// # Errors
    /// When it fails, or a job was not confirmed or has no result.
    pub(crate) async fn produce_input(
        &self,
        env: &Env<'_>,
        kind: &str,
        input: &Path,
    ) -> anyhow::Result<Duration> {
        let mut command = self.command("producer", env);
        command
            .args(["--kind", kind, "--wait", "--input"])
            .arg(input)
            .stderr(Stdio::piped());
        let started = tokio::time::Instant::now();
        let output = command.output().await.context("cannot run producer")?;
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() || !stderr.contains("missing 0") {
            bail!("producer failed ({}): {stderr}", output.status);
        }
        Ok(took)
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
}
