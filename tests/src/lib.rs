//! Integration tests live in `tests/api`; this library holds the test-only kinds that both
//! the in-process tests and the `test-consumer` binary serve.

pub mod fan;
