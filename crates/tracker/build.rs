//! Compiles the eBPF programs (src/bpf/tracker.bpf.c for block devices, src/bpf/files.bpf.c
//! for image files) with clang and generates their libbpf-rs skeletons into OUT_DIR. Needs
//! clang (hack/tools.sh installs it).

use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

/// Each program and the name of its skeleton.
const PROGRAMS: [(&str, &str); 2] = [("src/bpf/tracker.bpf.c", "tracker"), ("src/bpf/files.bpf.c", "files")];

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (src, name) in PROGRAMS {
        SkeletonBuilder::new()
            .source(src)
            .obj(out_dir.join(format!("{name}.bpf.o")))
            // The programs carry their own CO-RE type declarations (src/bpf/kernel.h), so
            // no kernel headers or vmlinux.h are needed at build time.
            .clang_args(["-Wall", "-Werror", "-O2"])
            .build_and_generate(out_dir.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|e| panic!("building {src} failed (is clang installed? run hack/tools.sh): {e:#}"));
    }
    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rustc-env=SITERECOVERY_TRACKER_BPF_ID={:016x}", source_id(PROGRAMS[0].0));
    println!("cargo:rustc-env=SITERECOVERY_FILES_BPF_ID={:016x}", source_id(PROGRAMS[1].0));
}

/// FNV-1a of a program's eBPF sources (the headers and the program: names and contents): the
/// identity under which a tracker pins its program and maps. A build resumes only its own
/// program's pins, and takes over another build's whose maps have its `MAPS_VERSION`
/// (src/pin.rs). Stable across compilers, unlike `DefaultHasher`.
fn source_id(program: &str) -> u64 {
    let files = [PathBuf::from("src/bpf/kernel.h"), PathBuf::from("src/bpf/slots.h"), PathBuf::from(program)];
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
