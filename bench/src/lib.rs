//! Benchmarks of Site Recovery against a real local control plane (`make bench`).
//!
//! Figures are printed and written as JSON under `target/bench/`; nothing here asserts
//! on timings (tests do not either): a run reports each figure beside its goal, and
//! `docs/benchmarks.md` keeps the recorded runs.

pub mod fleet;
pub mod metrics;
pub mod oplog;
pub mod report;
