//! Fixed VHD: the disk's bytes followed by a 512-byte footer (Microsoft "Virtual Hard
//! Disk Image Format Specification" 1.0, section "Hard Disk Footer Format"; appendix
//! "CHS Calculation"). It is what Azure imports a managed disk from: a page blob whose
//! virtual size is a whole number of MiB, footer last. Written by hand because it is 512
//! bytes of fixed big-endian fields; no maintained crate writes VHD footers.
//!
//! Pure: no I/O. `page_blob.rs` uploads what this builds.

/// Length of the footer at the end of every VHD.
pub const FOOTER_LEN: usize = 512;
/// Azure requires a VHD's virtual size to be a multiple of 1 MiB.
pub const VHD_ALIGN: u64 = 1024 * 1024;
/// Largest page blob Azure accepts (8 TiB); the VHD, footer included, must fit.
pub const MAX_PAGE_BLOB: u64 = 8 * 1024 * 1024 * 1024 * 1024;

const COOKIE: &[u8; 8] = b"conectix";
/// Bit 1 ("reserved") must always be set.
const FEATURES: u32 = 0x0000_0002;
const FORMAT_VERSION: u32 = 0x0001_0000;
/// Fixed disks have no dynamic header.
const DATA_OFFSET_NONE: u64 = u64::MAX;
/// Readers (qemu, Hyper-V tooling) take "Current Size" as the disk's size only for
/// creators known to write exact sizes, and otherwise round it down to the CHS geometry,
/// which loses the tail of a disk whose size is not a CHS product (most MiB multiples).
/// Windows' own creator id, "win ", is one they trust; Azure reads Current Size either way.
const CREATOR_APP: &[u8; 4] = b"win ";
/// Creator version: ours, 1.0.
const CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator host OS "Wi2k", as Windows writes it.
const CREATOR_HOST_OS: u32 = 0x5769_326B;
/// Disk type 2: fixed hard disk.
pub const DISK_TYPE_FIXED: u32 = 2;
/// 2000-01-01T00:00:00Z, the VHD epoch, in Unix seconds.
const VHD_EPOCH: i64 = 946_684_800;

/// Cylinders, heads and sectors per track, as the footer records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// Bytes the geometry addresses (≤ the disk size: CHS rounds down).
    pub fn bytes(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track) * 512
    }
}

/// The VHD's virtual size for a disk of `disk_size` bytes: rounded up to a whole MiB.
/// The bytes past the disk's end read as zeros.
pub fn vhd_data_size(disk_size: u64) -> u64 {
    disk_size.div_ceil(VHD_ALIGN) * VHD_ALIGN
}

/// The geometry of a disk of `size` bytes, by the specification's algorithm (the same
/// qemu and Hyper-V use), capped at 65535 × 16 × 255 sectors (~127 GiB) as it prescribes.
pub fn chs_geometry(size: u64) -> Geometry {
    let mut total = (size / 512).min(65_535 * 16 * 255);
    let (sectors, heads, cyl_times_heads);
    if total >= 65_535 * 16 * 63 {
        sectors = 255;
        heads = 16;
        cyl_times_heads = total / sectors;
    } else {
        let mut s = 17;
        let mut cth = total / s;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = total / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = total / s;
        }
        (sectors, heads, cyl_times_heads) = (s, h, cth);
    }
    total = cyl_times_heads / heads;
    Geometry { cylinders: total as u16, heads: heads as u8, sectors_per_track: sectors as u8 }
}

/// The footer of a fixed VHD whose data part is `data_size` bytes (a multiple of
/// [`VHD_ALIGN`]). `created` is the footer's time stamp (seconds since 2000, saturating);
/// `unique_id` identifies the image (the spec's UUID field).
pub fn fixed_footer(data_size: u64, created: jiff::Timestamp, unique_id: [u8; 16]) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    let geometry = chs_geometry(data_size);
    let stamp = u32::try_from((created.as_second() - VHD_EPOCH).max(0)).unwrap_or(u32::MAX);
    f[0..8].copy_from_slice(COOKIE);
    f[8..12].copy_from_slice(&FEATURES.to_be_bytes());
    f[12..16].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    f[16..24].copy_from_slice(&DATA_OFFSET_NONE.to_be_bytes());
    f[24..28].copy_from_slice(&stamp.to_be_bytes());
    f[28..32].copy_from_slice(CREATOR_APP);
    f[32..36].copy_from_slice(&CREATOR_VERSION.to_be_bytes());
    f[36..40].copy_from_slice(&CREATOR_HOST_OS.to_be_bytes());
    f[40..48].copy_from_slice(&data_size.to_be_bytes()); // original size
    f[48..56].copy_from_slice(&data_size.to_be_bytes()); // current size
    f[56..58].copy_from_slice(&geometry.cylinders.to_be_bytes());
    f[58] = geometry.heads;
    f[59] = geometry.sectors_per_track;
    f[60..64].copy_from_slice(&DISK_TYPE_FIXED.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    // 84: saved state 0; 85..512 reserved, zero.
    let sum = checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The footer checksum: the one's complement of the byte sum of the footer with the
/// checksum field (bytes 64..68) counted as zero.
pub fn checksum(footer: &[u8; FOOTER_LEN]) -> u32 {
    let sum = footer.iter().enumerate().filter(|(i, _)| !(64..68).contains(i)).map(|(_, &b)| u32::from(b)).sum::<u32>();
    !sum
}

/// What a footer says, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Disk type (2: fixed).
    pub disk_type: u32,
    /// Virtual size in bytes.
    pub current_size: u64,
    /// Size at creation.
    pub original_size: u64,
    /// Recorded geometry.
    pub geometry: Geometry,
    /// Seconds since 2000-01-01T00:00:00Z.
    pub timestamp: u32,
    /// Creator application (4 characters).
    pub creator_app: [u8; 4],
    /// The image's id.
    pub unique_id: [u8; 16],
}

/// Parses and checks a footer: cookie, checksum, and the fields a fixed disk must have.
pub fn parse_footer(bytes: &[u8]) -> Result<Footer, String> {
    let f: &[u8; FOOTER_LEN] = bytes.try_into().map_err(|_| format!("a footer is 512 bytes, not {}", bytes.len()))?;
    if &f[0..8] != COOKIE {
        return Err(format!("cookie is {:?}, not \"conectix\"", String::from_utf8_lossy(&f[0..8])));
    }
    let u32_at = |i: usize| u32::from_be_bytes(f[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(f[i..i + 8].try_into().expect("8 bytes"));
    let (stored, computed) = (u32_at(64), checksum(f));
    if stored != computed {
        return Err(format!("checksum is {stored:#010x}, the footer sums to {computed:#010x}"));
    }
    if u32_at(12) != FORMAT_VERSION {
        return Err(format!("file format version {:#010x}", u32_at(12)));
    }
    Ok(Footer {
        disk_type: u32_at(60),
        current_size: u64_at(48),
        original_size: u64_at(40),
        geometry: Geometry { cylinders: u16::from_be_bytes([f[56], f[57]]), heads: f[58], sectors_per_track: f[59] },
        timestamp: u32_at(24),
        creator_app: f[28..32].try_into().expect("4 bytes"),
        unique_id: f[68..84].try_into().expect("16 bytes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn data_size_rounds_up_to_whole_mib() {
        assert_eq!(vhd_data_size(1), MIB);
        assert_eq!(vhd_data_size(MIB), MIB);
        assert_eq!(vhd_data_size(MIB + 1), 2 * MIB);
        assert_eq!(vhd_data_size(10 * 1024 * MIB - 4095), 10 * 1024 * MIB);
    }

    #[test]
    fn geometry_follows_the_specification() {
        // Small disks: 17 sectors per track, at least 4 heads.
        assert_eq!(chs_geometry(MIB), Geometry { cylinders: 30, heads: 4, sectors_per_track: 17 });
        // 1 GiB: 17 × 4 overflows 1024 cylinders × heads, so 63 sectors, 16 heads.
        assert_eq!(chs_geometry(1024 * MIB), Geometry { cylinders: 2080, heads: 16, sectors_per_track: 63 });
        // From 65535 × 16 × 63 sectors on: 255 sectors, 16 heads.
        assert_eq!(chs_geometry(40 * 1024 * MIB), Geometry { cylinders: 20560, heads: 16, sectors_per_track: 255 });
        // Capped at the largest geometry (~127 GiB).
        let max = Geometry { cylinders: 65535, heads: 16, sectors_per_track: 255 };
        assert_eq!(chs_geometry(1024 * 1024 * MIB), max);
        for size in [MIB, 3 * MIB, 100 * MIB, 1024 * MIB, 40 * 1024 * MIB] {
            assert!(chs_geometry(size).bytes() <= size, "CHS never addresses more than the disk");
        }
    }

    #[test]
    fn footer_fields_and_checksum() {
        let id = *b"0123456789abcdef";
        let f = fixed_footer(3 * MIB, at("2026-11-27T10:00:00Z"), id);
        assert_eq!(&f[0..8], b"conectix");
        let parsed = parse_footer(&f).unwrap();
        assert_eq!(parsed.disk_type, DISK_TYPE_FIXED);
        assert_eq!((parsed.current_size, parsed.original_size), (3 * MIB, 3 * MIB));
        assert_eq!(parsed.geometry, chs_geometry(3 * MIB));
        assert_eq!(parsed.timestamp, (at("2026-11-27T10:00:00Z").as_second() - VHD_EPOCH) as u32);
        assert_eq!(parsed.unique_id, id);
        assert_eq!(&f[16..24], &[0xff; 8], "fixed disks have no data offset");
        assert!(f[85..].iter().all(|&b| b == 0), "reserved bytes are zero");
        // The checksum by hand: one's complement of the byte sum without its own field.
        let sum: u32 = f[..64].iter().chain(&f[68..]).map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_be_bytes(f[64..68].try_into().unwrap()), !sum);
        // Any flipped bit is noticed.
        for i in [0usize, 30, 50, 66, 70, 300, 511] {
            let mut bad = f;
            bad[i] ^= 0x10;
            assert!(parse_footer(&bad).is_err(), "byte {i} flipped");
        }
        // Same input, same footer: a retried restore writes identical bytes.
        assert_eq!(f, fixed_footer(3 * MIB, at("2026-11-27T10:00:00Z"), id));
        // Times before the VHD epoch saturate instead of wrapping.
        assert_eq!(parse_footer(&fixed_footer(MIB, at("1990-01-01T00:00:00Z"), id)).unwrap().timestamp, 0);
    }

    fn qemu_img(args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new("qemu-img").args(args).output().unwrap_or_else(|e| {
            panic!("qemu-img is needed by this test (Debian: qemu-utils; hack/tools.sh installs it): {e}")
        });
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    /// qemu's VHD driver reads a file made of data + our footer as a fixed VHD of exactly
    /// the data's size and returns the data bit for bit.
    #[test]
    fn qemu_img_reads_our_fixed_vhd_back() {
        let dir = tempfile::tempdir().unwrap();
        // 3 MiB + 7 MiB: neither is a CHS product, so a reader that used CHS would lose the tail.
        for mib in [3u64, 7] {
            let size = mib * MIB;
            let data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let vhd = dir.path().join(format!("{mib}.vhd"));
            let mut file = data.clone();
            file.extend_from_slice(&fixed_footer(size, at("2026-11-27T10:00:00Z"), [7; 16]));
            std::fs::write(&vhd, &file).unwrap();
            let info = qemu_img(&["info", "-f", "vpc", "--output=json", vhd.to_str().unwrap()]);
            let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
            assert_eq!(info["virtual-size"], size, "{info}");
            let raw = dir.path().join(format!("{mib}.raw"));
            qemu_img(&["convert", "-f", "vpc", "-O", "raw", vhd.to_str().unwrap(), raw.to_str().unwrap()]);
            assert!(std::fs::read(&raw).unwrap() == data, "qemu-img convert returns the data");
        }
    }

    /// Our geometry equals the one qemu computes (it implements the same appendix of the
    /// specification), and we parse qemu's fixed footers. qemu rounds a size up to a CHS
    /// product (or, with `force_size`, records the largest geometry), so the sizes
    /// compared are CHS products.
    #[test]
    fn geometry_matches_qemu() {
        let dir = tempfile::tempdir().unwrap();
        for mib in [1u64, 3, 64, 1000, 1024, 40 * 1024] {
            let exact = chs_geometry(mib * MIB).bytes();
            let path = dir.path().join(format!("{mib}.vhd"));
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=fixed",
                path.to_str().unwrap(),
                &exact.to_string(),
            ]);
            // Read only the footer: the file is as large as the disk (sparse).
            let file = std::fs::File::open(&path).unwrap();
            let mut tail = [0u8; FOOTER_LEN];
            let len = file.metadata().unwrap().len();
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut tail, len - FOOTER_LEN as u64).unwrap();
            let footer = parse_footer(&tail).unwrap();
            assert_eq!(footer.disk_type, DISK_TYPE_FIXED);
            assert_eq!(footer.current_size, exact);
            assert_eq!(footer.geometry, chs_geometry(exact), "{exact} bytes");
        }
    }
}
