//! mdbridge: a market-data fan-out bridge.
//!
//! Exchange WebSocket feeds are normalized into one event format, published once to Redis
//! pub/sub (or an in-process bus), and fanned out to many local bot clients over a
//! WebSocket server. The contract users rely on is `docs/protocol.md`.
//!
//! # Layout
//!
//! Modules in the order one event travels through them:
//!
//! - [`exchange`]: one socket per feed, adapters that parse exchange frames into
//!   [`event::Event`]s, order-book synchronisation (`exchange::book_sync`).
//! - [`event`]: the normalized events, channels and subscription patterns (leaf).
//! - [`envelope`]: the bus envelope; an event is serialized once, here.
//! - [`bus`]: the publisher pipeline (sequence numbers, Redis pipelining, latest-value
//!   keys) and the Redis subscriber (reconnects, liveness probe, loss counting).
//! - [`gateway`]: the bot WebSocket server: router, per-client bounded queues.
//! - [`book`]: the L2 book both sides keep from normalized events (leaf).
//! - [`http`], [`health`], [`metrics`]: the admin listener and what it reports;
//!   [`fd_limit`]: the descriptor budget they and the bot listener share.
//! - [`config`]: every setting, one place; [`durable`]: which channels are kept in Redis
//!   Streams, their caps and key names.
//! - [`simulator`]: exchange-compatible servers for tests, demo and benchmarks.
//! - [`app`]: wires the parts for each role and owns shutdown.
//! - [`bench`]: bot-side tools: the measuring bot behind `mdbridge bench`, and `mdbridge watch`.

pub mod app;
pub mod bench;
pub mod book;
pub mod bus;
pub mod config;
pub mod durable;
pub mod envelope;
pub mod event;
pub mod exchange;
pub mod fd_limit;
pub mod gateway;
pub mod health;
pub mod http;
pub mod metrics;
pub mod simulator;
pub mod status;
