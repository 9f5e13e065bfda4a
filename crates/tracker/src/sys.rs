//! The one system call the tracker needs that neither std nor nix wraps.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

/// Writes back every dirty page of `file` and waits for it (`sync_file_range` with
/// `WAIT_BEFORE | WRITE | WAIT_AFTER` over the whole file): afterwards each page that was
/// dirty when the call began is clean, so its next write dirties it again. Unlike
/// `fdatasync` it neither commits the journal nor flushes the device's cache.
pub(crate) fn write_back(file: &std::fs::File) -> std::io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
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
