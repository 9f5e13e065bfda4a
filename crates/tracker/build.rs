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
    println!("cargo:rustc-env=SITERECOVERY_TRACKER_BPF_ID={:016x}", source_id());
}

/// FNV-1a of the eBPF sources (names and contents, in name order): the identity under
/// which a tracker pins its program and maps, so a build with a different program never
/// resumes another's (src/pin.rs). Stable across compilers, unlike `DefaultHasher`.
fn source_id() -> u64 {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir("src/bpf").expect("src/bpf exists").map(|e| e.expect("src/bpf is readable").path()).collect();
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        let name = f.file_name().expect("a file name").to_string_lossy().into_owned();
        let body = std::fs::read(&f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        for b in name.bytes().chain([0]).chain(body) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
