//! The libbpf-rs skeleton that build.rs generates from src/bpf/tracker.bpf.c.
//!
//! The only unsafe code in the crate lives in this generated glue: it hands libbpf the
//! embedded object file and raw pointers to the skeleton's maps, programs and links,
//! whose lifetimes the generated types tie to the `OpenObject` storage that
//! `worker::run` keeps on its stack for as long as the skeleton lives. Nothing of it
//! is public; the rest of the crate denies unsafe code.
#![allow(unsafe_code, missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/tracker.skel.rs"));
