//! The Site Recovery operator (configuration-server role): one reconciler module per
//! custom resource, plus the shared context, errors, status helpers, leader election
//! and telemetry. `crdgen` renders the CRDs from `siterecovery-api`.

pub mod context;
pub mod crdgen;
pub mod error;
pub mod failback;
pub mod leader;
pub mod plan;
pub mod policy;
pub mod processserver;
pub mod registration;
pub mod server;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod watch;
