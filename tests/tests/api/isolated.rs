//! A broker node of its own, for tests that set a memory alarm: an alarm blocks every publisher
//! on its node, so it must never reach the shared broker other tests run on in parallel.
//!
//! - `ISOLATED_AMQP_URL` and `ISOLATED_RABBITMQ_NODE` set (`scripts/rabbitmq-node.sh`): a node
//!   on this host, driven with `rabbitmqctl -n <node>`;
//! - otherwise, with `AMQP_URL` unset (the testcontainers run): a second RabbitMQ container,
//!   driven with `rabbitmqctl` inside it.
//!
//! Tests that use it hold [`Isolated::lock`] for their whole run, so they never overlap.

use std::{process::Command, time::Duration};

use testcontainers_modules::{
    rabbitmq::RabbitMq,
    testcontainers::{
        ContainerAsync,
        core::{CmdWaitFor, ExecCommand},
        runners::AsyncRunner,
    },
};
use tokio::sync::{Mutex, MutexGuard, OnceCell};

use crate::helpers::rabbitmq_request;

/// An isolated node and how to reach its `rabbitmqctl`.
pub struct Isolated {
    /// Its AMQP URL.
    pub url: String,
    control: Control,
}

enum Control {
    Host(String),
    Container(Box<ContainerAsync<RabbitMq>>),
}

static NODE: OnceCell<Isolated> = OnceCell::const_new();
static LOCK: Mutex<()> = Mutex::const_new(());

/// The isolated node, started on first use, and the lock that keeps its tests apart.
pub async fn isolated() -> (MutexGuard<'static, ()>, &'static Isolated) {
    let guard = LOCK.lock().await;
    let node = NODE.get_or_init(start).await;
    (guard, node)
}

async fn start() -> Isolated {
    if let (Ok(url), Ok(node)) = (
        std::env::var("ISOLATED_AMQP_URL"),
        std::env::var("ISOLATED_RABBITMQ_NODE"),
    ) {
        return Isolated {
            url,
            control: Control::Host(node),
        };
    }
    assert!(
        std::env::var_os("AMQP_URL").is_none(),
        "tests that set a memory alarm need a broker node of their own: with AMQP_URL set, \
         start one with `eval \"$(scripts/rabbitmq-node.sh)\"` (it sets ISOLATED_AMQP_URL and \
         ISOLATED_RABBITMQ_NODE), or unset AMQP_URL to let testcontainers start one"
    );
    let container = rabbitmq_request()
        .start()
        .await
        .expect("a second RabbitMQ container for the isolated tests");
    let host = container.get_host().await.unwrap();
    let port = container.get_host_port_ipv4(5672).await.unwrap();
    Isolated {
        url: format!("amqp://guest:guest@{host}:{port}/%2f"),
        control: Control::Container(Box::new(container)),
    }
}

impl Isolated {
    /// Runs `rabbitmqctl` with `args` on the node and returns its output; panics if it fails.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> String {
        match &self.control {
            Control::Host(node) => {
                let mut command = Command::new("rabbitmqctl");
                command.arg("-n").arg(node).args(args);
                let output = tokio::task::spawn_blocking(move || command.output())
                    .await
                    .unwrap()
                    .expect("rabbitmqctl runs");
                assert!(
                    output.status.success(),
                    "rabbitmqctl {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
            Control::Container(container) => {
                let command =
                    ExecCommand::new(std::iter::once("rabbitmqctl").chain(args.iter().copied()))
                        .with_cmd_ready_condition(CmdWaitFor::exit_code(0));
                let mut result =
                    tokio::time::timeout(Duration::from_secs(60), container.exec(command))
                        .await
                        .expect("rabbitmqctl answers within 60 s")
                        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?} in the container: {e}"));
                String::from_utf8_lossy(&result.stdout_to_vec().await.unwrap()).into_owned()
            }
        }
    }

    /// Sets a memory alarm on the node: every connection that publishes is blocked until the
    /// returned guard is cleared or dropped (a failing test must not leave the node blocked).
    pub async fn raise_memory_alarm(&'static self) -> Alarm {
        self.rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"])
            .await;
        Alarm { node: Some(self) }
    }
}

/// A memory alarm in effect; cleared (back to RabbitMQ's default watermark) by [`Alarm::clear`]
/// or on drop.
pub struct Alarm {
    node: Option<&'static Isolated>,
}

impl Alarm {
    /// Clears the alarm.
    pub async fn clear(mut self) {
        if let Some(node) = self.node.take() {
            node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
                .await;
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            let clear = node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(clear));
        }
    }
}
