//! The Site Recovery operator (configuration-server role). For now it carries the CRD
//! generator shared by the `crdgen` binary and the freshness test; the reconcilers
//! live here too as they arrive, one module per kind.

pub mod crdgen;
