//! A new kind, `order.quote`, made of two custom stages, served next to the built-in ones:
//! `decode -> price` (asks a pricing service over HTTP) `-> total` (adds tax).
//!
//! Run it like the consumer: `PRICING_URL=http://127.0.0.1:9000 cargo run -p consumer --example custom_kind`,
//! then send `{"sku": "A1", "qty": 3}` payloads with `producer --kind order.quote --input orders.jsonl`.

use clap::Parser;
use consumer::{
    Registry, Settings,
    stage::{Chain, Stage, StageError, decode},
};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Order {
    sku: String,
    qty: u32,
}

/// Asks the pricing service `GET {base}/price/{sku}` for a unit price in cents.
struct Price {
    base: String,
    http: reqwest::Client,
}

impl Stage for Price {
    type Input = Order;
    type Output = (Order, u64);

    fn name(&self) -> &'static str {
        "price"
    }

    async fn run(&self, order: Order) -> Result<(Order, u64), StageError> {
        let url = format!("{}/price/{}", self.base, order.sku);
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(StageError::retryable)?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(StageError::permanent(format!("unknown sku {}", order.sku)));
        }
        let text = response.text().await.map_err(StageError::retryable)?;
        let cents = text.trim().parse().map_err(StageError::permanent)?;
        Ok((order, cents))
    }
}

#[derive(Serialize)]
struct Quote {
    sku: String,
    total_cents: u64,
}

/// Quantity times unit price, plus 20 % tax.
struct Total;

impl Stage for Total {
    type Input = (Order, u64);
    type Output = Quote;

    fn name(&self) -> &'static str {
        "total"
    }

    async fn run(&self, (order, cents): (Order, u64)) -> Result<Quote, StageError> {
        let net = cents * u64::from(order.qty);
        Ok(Quote {
            sku: order.sku,
            total_cents: net + net / 5,
        })
    }
}

fn quote_chain(base: String) -> impl Chain<Input = consumer::stage::Payload, Output = Quote> {
    let price = Price {
        base,
        http: reqwest::Client::new(),
    };
    decode::<Order>().then(price).then(Total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    shared::telemetry::init(settings.common.log_format);
    let base = std::env::var("PRICING_URL").unwrap_or_else(|_| "http://127.0.0.1:9000".into());
    let registry = Registry::builtin().register("order.quote", quote_chain(base));
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(shared::telemetry::cancel_on_signal(shutdown.clone()));
    Ok(consumer::run(settings, registry, shutdown).await?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{Router, extract::Path, http::StatusCode, routing::get};
    use consumer::stage::{Payload, Trace};

    use super::*;

    #[tokio::test]
    async fn quotes_against_a_local_pricing_service() {
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
        let chain = quote_chain(base);
        let run = |json: &str| {
            let payload =
                Payload::new(serde_json::value::RawValue::from_string(json.into()).expect("json"));
            let chain = &chain;
            async move {
                chain
                    .run_traced(payload, &mut Trace::new(Duration::from_secs(5)))
                    .await
            }
        };

        let quote = run(r#"{"sku": "A1", "qty": 3}"#).await.expect("a quote");
        assert_eq!(quote.total_cents, 900);
        let failure = run(r#"{"sku": "ZZ", "qty": 1}"#)
            .await
            .err()
            .expect("unknown sku");
        assert_eq!(failure.stage, "price");
        assert!(!failure.error.is_retryable());
    }
}
