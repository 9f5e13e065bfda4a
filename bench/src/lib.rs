//! Benchmarks of Site Recovery (`make bench`): the operator against a real local control
//! plane, and the data plane against peer tools.
//!
//! Figures are printed and written as JSON under `target/bench/`; nothing here asserts
//! on timings (tests do not either): a run reports each figure beside its goal, and
//! `docs/benchmarks.md` keeps the recorded runs.

pub mod dataplane;
pub mod fleet;
pub mod metrics;
pub mod oplog;
pub mod report;
