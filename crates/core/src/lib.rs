//! Pure domain logic of Site Recovery: no Kubernetes client, no I/O, no clock reads
//! (callers pass `now`). Reconcilers observe, ask this crate what to do, and apply.

pub mod assignment;
pub mod bandwidth;
pub mod lifecycle;
pub mod retention;
pub mod rpo;
