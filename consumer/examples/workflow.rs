//! A workflow across two deployments: `order.quote` prices an order, then hops to
//! `order.ship`, which a different deployment serves (say, the one that holds the carrier's
//! credentials). One job id, one final result, carrying every stage of both hops.
//!
//! ```text
//! producer ─ order.quote ─▶ [front: --kinds order.quote]  decode → price → hop
//!                                         │ continuation (same id), confirmed before the ack
//!                                         ▼
//!                           [shipping: --kinds order.ship] decode → ship ─▶ result of the job
//! ```
//!
//! Run the two deployments (any number of each) and send orders:
//!
//! ```text
//! cargo run -p consumer --example workflow -- --kinds order.quote &
//! CONSUMER_HTTP_ADDR=127.0.0.1:9401 cargo run -p consumer --example workflow -- --kinds order.ship &
//! echo '{"sku": "A1", "qty": 3}' | cargo run -p producer -- --kind order.quote --input - --wait
//! ```
//!
//! Prices come from a pricing service `GET {PRICING_URL}/price/{sku}` when `PRICING_URL` is set,
//! else from a built-in table (`A1`: 250 cents, `B2`: 1000 cents).

use clap::Parser;
use consumer::{
    Registry, Settings,
    stage::{Chain, Stage, StageError},
};

/// The contract both deployments share. In a real project this module is a small crate that
/// both depend on (it needs only `serde` and `shared`): changing a payload type then fails to
/// compile wherever the two sides no longer agree.
pub mod contract {
    use serde::{Deserialize, Serialize};
    use shared::workflow::Kind;

    /// What a client sends.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Order {
        /// The article.
        pub sku: String,
        /// How many.
        pub qty: u32,
    }

    /// A priced order: what the shipping deployment takes.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Parcel {
        /// The article.
        pub sku: String,
        /// How many.
        pub qty: u32,
        /// Quantity times unit price, before tax.
        pub net_cents: u64,
    }

    /// The final output of both kinds.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Shipment {
        /// The article.
        pub sku: String,
        /// Net plus 20 % tax.
        pub total_cents: u64,
        /// The carrier's tracking code.
        pub tracking: String,
    }

    /// `order.quote`: an order in, a shipment out (by way of `order.ship`).
    pub struct QuoteKind;
    impl Kind for QuoteKind {
        const NAME: &'static str = "order.quote";
        type Payload = Order;
        type Output = Shipment;
    }

    /// `order.ship`: a priced order in, a shipment out.
    pub struct ShipKind;
    impl Kind for ShipKind {
        const NAME: &'static str = "order.ship";
        type Payload = Parcel;
        type Output = Shipment;
    }
}

use contract::{Order, Parcel, QuoteKind, ShipKind, Shipment};

/// Prices an order: from the pricing service at `base`, or from the built-in table.
struct Price {
    base: Option<String>,
    http: reqwest::Client,
}

impl Price {
    async fn unit_cents(&self, sku: &str) -> Result<u64, StageError> {
        let Some(base) = &self.base else {
            return match sku {
                "A1" => Ok(250),
                "B2" => Ok(1000),
                _ => Err(StageError::permanent(format!("unknown sku {sku}"))),
            };
        };
        let response = self
            .http
            .get(format!("{base}/price/{sku}"))
            .send()
            .await
            .map_err(StageError::retryable)?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(StageError::permanent(format!("unknown sku {sku}")));
        }
        let text = response.text().await.map_err(StageError::retryable)?;
        text.trim().parse().map_err(StageError::permanent)
    }
}

impl Stage for Price {
    type Input = Order;
    type Output = Parcel;

    fn name(&self) -> &'static str {
        "price"
    }

    async fn run(&self, order: Order) -> Result<Parcel, StageError> {
        let unit = self.unit_cents(&order.sku).await?;
        Ok(Parcel {
            net_cents: unit * u64::from(order.qty),
            sku: order.sku,
            qty: order.qty,
        })
    }
}

/// Adds 20 % tax and books the carrier.
struct Ship;

impl Stage for Ship {
    type Input = Parcel;
    type Output = Shipment;

    fn name(&self) -> &'static str {
        "ship"
    }

    async fn run(&self, parcel: Parcel) -> Result<Shipment, StageError> {
        Ok(Shipment {
            tracking: format!("TRK-{}-{}", parcel.sku, parcel.qty),
            total_cents: parcel.net_cents + parcel.net_cents / 5,
            sku: parcel.sku,
        })
    }
}

/// Both kinds; `--kinds` picks which one a deployment serves.
fn registry(pricing: Option<String>) -> Registry {
    let price = Price {
        base: pricing,
        http: reqwest::Client::new(),
    };
    Registry::builtin()
        // Compiles only because Price's output is ShipKind's payload, and ShipKind's output
        // is QuoteKind's.
        .serve::<QuoteKind, _>(price.hop::<ShipKind>())
        .serve::<ShipKind, _>(Ship)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    shared::telemetry::init(settings.common.log_format);
    let registry = registry(std::env::var("PRICING_URL").ok());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
    Ok(consumer::run(settings, registry, shutdown).await?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{Router, extract::Path, http::StatusCode, routing::get};
    use consumer::{
        registry::Finished,
        stage::{Payload, Trace, decode},
    };

    use super::*;

    fn payload(json: &str) -> Payload {
        Payload::new(serde_json::value::RawValue::from_string(json.into()).expect("json"))
    }

    #[tokio::test]
    async fn quote_hops_to_ship_with_a_priced_parcel() {
        let registry = registry(None);
        let quote = registry.get("order.quote").expect("served");
        let mut trace = Trace::new(Duration::from_secs(5));
        let ended = quote
            .run(payload(r#"{"sku": "A1", "qty": 3}"#), &mut trace)
            .await
            .expect("a hop");
        let Finished::Hop {
            kind,
            payload: next,
        } = ended
        else {
            panic!("expected a hop, got {ended:?}");
        };
        assert_eq!(kind, "order.ship");
        let ship = registry.get(kind).expect("served");
        let Finished::Output(out) = ship
            .run(Payload::new(next), &mut trace)
            .await
            .expect("shipped")
        else {
            panic!("expected an output");
        };
        let shipment: Shipment = serde_json::from_str(out.get()).expect("a shipment");
        assert_eq!(shipment.total_cents, 900);
        let stages: Vec<_> = trace.into_timings().into_iter().map(|t| t.name).collect();
        assert_eq!(stages, ["decode", "price", "hop", "decode", "ship"]);
    }

    #[tokio::test]
    async fn prices_from_a_local_pricing_service() {
        let app = Router::new().route(
            "/price/{sku}",
            get(|Path(sku): Path<String>| async move {
                if sku == "A1" {
                    (StatusCode::OK, "250")
                } else {
                    (StatusCode::NOT_FOUND, "")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let price = Price {
            base: Some(base),
            http: reqwest::Client::new(),
        };
        let chain = decode::<Order>().then(price);
        let run = |json: &str| {
            let payload = payload(json);
            let chain = &chain;
            async move {
                chain
                    .run_traced(payload, &mut Trace::new(Duration::from_secs(5)))
                    .await
            }
        };
        let parcel = run(r#"{"sku": "A1", "qty": 3}"#).await.expect("a price");
        assert_eq!(parcel.net_cents, 750);
        let failure = run(r#"{"sku": "ZZ", "qty": 1}"#)
            .await
            .expect_err("unknown sku");
        assert_eq!(failure.stage, "price");
        assert!(!failure.error.is_retryable());
    }
}
