//! The driftwatch collector: it keeps the fleet's drift state. Agents enroll (a single-use
//! token and a CSR for a client certificate from the collector's CA) and stream their hosts'
//! violation sets over gRPC with mutual TLS; the collector commits each report before it
//! acknowledges it and serves the state to people over an HTTP JSON API and the `driftwatch`
//! CLI.

pub mod api;
pub mod cli_client;
pub mod escape;
pub mod host_state;
pub mod http;
pub mod storage;
