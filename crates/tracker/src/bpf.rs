//! The libbpf-rs skeleton that build.rs generates from src/bpf/tracker.bpf.c.
#![allow(unsafe_code, missing_docs, clippy::all)]
include!(concat!(env!("OUT_DIR"), "/tracker.skel.rs"));
