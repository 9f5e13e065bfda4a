//! Compiles the eBPF program (src/bpf/tracker.bpf.c) with clang and generates its
//! libbpf-rs skeleton into OUT_DIR. Needs clang (hack/tools.sh installs it).

use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/tracker.bpf.c";

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("tracker.skel.rs");
    SkeletonBuilder::new()
        .source(SRC)
        // The program carries its own CO-RE type declarations (src/bpf/kernel.h), so no
        // kernel headers or vmlinux.h are needed at build time.
        .clang_args(["-Wall", "-Werror", "-O2"])
        .build_and_generate(&out)
        .unwrap_or_else(|e| panic!("building {SRC} failed (is clang installed? run hack/tools.sh): {e:#}"));
    println!("cargo:rerun-if-changed=src/bpf");
}
