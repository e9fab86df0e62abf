//! tcptrace: TCP handshake latency, failures and TIME_WAIT from eBPF, as Prometheus
//! metrics.
//!
//! Data flows one way: kernel -> [`probe`] (ring buffer) -> [`events`] (decode) ->
//! [`tracker`] (pair transitions) -> [`metrics`] -> [`server`] (HTTP).

pub mod events;
pub mod metrics;
pub mod tracker;
