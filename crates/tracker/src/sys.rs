//! The one system call the tracker needs that neither std nor nix wraps.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

/// Starts writing back every dirty page of `file`, after waiting for the writeback
/// already under way (`sync_file_range` with `WAIT_BEFORE | WRITE` over the whole file):
/// when it returns, each page that was dirty when it began has been made clean (and, if
/// mapped, write-protected), so its next write dirties it again. It does not wait for the
/// new writes to reach the disk, and unlike `fdatasync` it neither commits the journal nor
/// flushes the device's cache: page-cache bookkeeping, not durability.
///
/// Why the wait before: a page already under writeback is skipped by the write pass. It
/// was made clean when that writeback began, but a store since may have dirtied it again
/// (reported then); once that writeback ends the write pass makes it clean again.
pub(crate) fn write_back(file: &std::fs::File) -> std::io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE;
    // SAFETY: a plain system call on a descriptor that `file` keeps open for the call's
    // duration; it takes no pointers.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The inode's attribute flags (`FS_IOC_GETFLAGS`, what `lsattr` shows).
pub(crate) fn inode_flags(file: &std::fs::File) -> std::io::Result<u32> {
    let mut flags: libc::c_long = 0;
    // SAFETY: the kernel writes at most an int through the pointer, which points to a
    // live c_long on this stack frame; the descriptor is open for the call's duration.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags as *mut libc::c_long) };
    if rc == 0 { Ok(flags as u32) } else { Err(std::io::Error::last_os_error()) }
}
