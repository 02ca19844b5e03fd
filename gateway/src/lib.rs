//! The Courier gateway: WebSocket sessions on a thread-per-core monoio
//! runtime, with the router and its durable store embedded by default.
//!
//! A node is [`node::Node`]: it binds one SO_REUSEPORT listener per core,
//! starts the router thread and the metrics endpoint, and runs one
//! [`core`] per thread. Each core owns its sockets and its sessions; the
//! only cross-thread traffic is commands to the router and per-core batches
//! of deliveries back, through [`mailbox::Mailbox`].
//!
//! What the gateway does itself: the HTTP upgrade ([`handshake`]) and token
//! check, WebSocket framing and its rules, heartbeats and idle timeouts,
//! token expiry and refresh, per-session outbound queues with priorities
//! ([`session`]), and answering `Ping`; and, on the same listener, the
//! browser client's files for plain GETs ([`web`]). Everything about
//! messages and conversations is the router's.

pub mod admin;
pub mod alloc;
pub mod config;
pub mod config_file;
pub mod core;
pub mod fleet;
pub mod handshake;
pub mod iplimit;
pub mod mailbox;
pub mod metrics;
pub mod node;
pub mod probe;
pub mod process;
pub mod secret;
pub mod session;
pub mod throttle;
pub mod web;
