//! `--wait`: a private, exclusive queue bound to the results exchange, so this run sees
//! every result without taking any from the durable `jobs.results` queue that others read.
//!
//! It must start before the first publish, or a fast consumer's result could be missed.

use deadpool_lapin::lapin::{
    self, Connection,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use futures::StreamExt;
use serde::Deserialize;
use shared::topology::{MATCH_ALL, Names};
use tokio::sync::mpsc;
use uuid::Uuid;

/// One result as it arrived: its job id and the untouched body.
#[derive(Debug)]
pub struct Arrived {
    /// The job the result belongs to.
    pub job_id: Uuid,
    /// Whether the result says `ok`.
    pub ok: bool,
    /// The result body, JSON.
    pub body: Vec<u8>,
}

/// Receives every result published while it runs.
#[derive(Debug)]
pub struct Listener {
    /// Results in arrival order. Closed if the connection drops.
    pub results: mpsc::UnboundedReceiver<Arrived>,
}

impl Listener {
    /// Declares the private queue, binds it and starts consuming.
    ///
    /// # Errors
    /// Fails when the broker refuses the queue or the binding (for example, when the results
    /// exchange does not exist).
    pub async fn start(connection: &Connection, names: &Names) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                names.results_exchange.as_str().into(),
                MATCH_ALL.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "producer-wait".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let (tx, results) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                match parse(&delivery.data) {
                    Some((job_id, ok)) => {
                        if tx
                            .send(Arrived {
                                job_id,
                                ok,
                                body: delivery.data,
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                    None => tracing::warn!("ignoring a result that is not valid v1 JSON"),
                }
            }
        });
        Ok(Self { results })
    }
}

fn parse(body: &[u8]) -> Option<(Uuid, bool)> {
    #[derive(Deserialize)]
    struct Head {
        job_id: Uuid,
        status: shared::schema::Status,
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    Some((head.job_id, head.status == shared::schema::Status::Ok))
}
