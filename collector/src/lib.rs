//! The driftwatch collector: it keeps the fleet's drift state. Agents enroll (a single-use
//! token and a CSR for a client certificate from the collector's CA) and stream their hosts'
//! violation sets over gRPC with mutual TLS; the collector commits each report before it
//! acknowledges it and serves the state to people over an HTTP JSON API and the `driftwatch`
//! CLI.
//!
//! Start one with [`server::Server::bind`] and [`server::Server::run`] (or [`server::serve`]).

pub mod actions;
pub mod api;
pub mod ca;
pub mod cli;
pub mod cli_client;
pub mod config;
pub mod enroll;
pub mod export;
pub mod failpoint;
pub mod flagging;
pub mod host_state;
pub mod http;
pub mod ingest;
pub mod lifecycle;
pub mod logging;
pub mod priority;
pub mod reconcile;
pub mod registry;
pub mod revocation;
pub mod rpc_error;
pub mod security;
pub mod server;
pub mod storage;
pub mod tls;
pub mod token;
