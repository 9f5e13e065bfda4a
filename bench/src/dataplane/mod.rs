//! The data-plane benchmark (`dataplane` binary): our agent and process server against
//! restic and rsync on the same ext4 image, in the same run (docs/benchmarks.md).

pub mod blockdev;
pub mod compare;
pub mod imagedev;
pub mod median;
pub mod peers;
pub mod phases;
pub mod procs;
pub mod rig;
pub mod workload;
