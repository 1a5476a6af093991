//! The kinds this crate ships, each a chain of stages. Register your own with
//! [`crate::registry::Registry::register`].

pub mod bench_fanout;
pub mod bench_sleep;
pub mod http_fetch;
pub mod text_analyze;
