//! tcptrace: TCP handshake latency, failures and TIME_WAIT from eBPF, as Prometheus
//! metrics.
//!
//! Data flows one way: kernel -> [`probe`] (ring buffer) -> [`events`] (decode) ->
//! [`tracker`] (pair transitions) -> [`metrics`] -> [`server`] (HTTP). [`pipeline`]
//! is the I/O-free middle; [`daemon`] wires it all together.

pub mod btf;
pub mod cause;
pub mod check;
pub mod cli;
pub mod clock;
pub mod daemon;
pub mod error;
pub mod events;
pub mod lines;
pub mod listeners;
pub mod metrics;
pub mod page;
pub mod pipeline;
pub mod privileges;
pub mod probe;
pub mod procnet;
pub mod reader;
pub mod report;
pub mod seeding;
pub mod server;
pub mod shutdown;
pub mod tracefs;
pub mod tracker;
pub mod watch;
pub mod web_config;
