//! The libbpf-rs skeletons that build.rs generates from src/bpf/tracker.bpf.c (block
//! devices) and src/bpf/files.bpf.c (image files).
//!
//! The only unsafe code in the crate lives in this generated glue: it hands libbpf the
//! embedded object files and raw pointers to the skeletons' maps, programs and links,
//! whose lifetimes the generated types tie to the `OpenObject` storage that the workers
//! (`worker::run`, `files::run`) keep on their stacks for as long as a skeleton lives.
//! Nothing of it is public; the rest of the crate denies unsafe code.
#![allow(unsafe_code, missing_docs, clippy::all)]

mod tracker {
    include!(concat!(env!("OUT_DIR"), "/tracker.skel.rs"));
}

mod files {
    include!(concat!(env!("OUT_DIR"), "/files.skel.rs"));
}

pub(crate) use files::{FilesSkel, FilesSkelBuilder};
pub(crate) use tracker::{TrackerSkel, TrackerSkelBuilder};
