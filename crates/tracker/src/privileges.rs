//! Pre-flight checks, so that a missing capability or BTF gives a clear error rather
//! than libbpf's verifier output.

use std::path::Path;

use crate::TrackerError;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks the effective capabilities and kernel BTF.
pub(crate) fn check() -> Result<(), TrackerError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(TrackerError::NoBtf);
    }
    // Without /proc, let the kernel decide at load time.
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    match effective_caps(&status) {
        Some(caps) if !has_bpf_caps(caps) => Err(TrackerError::Permission),
        _ => Ok(()),
    }
}

fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn has_bpf_caps(caps: u64) -> bool {
    let has = |cap: u32| caps & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_bpf_perfmon_are_enough_nothing_less() {
        assert!(has_bpf_caps(0x000001ffffffffff));
        assert!(has_bpf_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!has_bpf_caps(1 << CAP_BPF));
        assert!(!has_bpf_caps(0));
    }

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x000001ffffffffff));
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }
}
