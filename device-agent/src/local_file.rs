//! Local files the agent reads that someone else may have put in place (the user's data files,
//! the device state): what a path is when it is not a regular file, so that a FIFO (whose open
//! blocks), a device such as `/dev/zero` (which never ends) or a directory is refused by name
//! before it is opened.

/// What `t` is when it is not a regular file; `None` for a regular file.
pub fn irregular_kind(t: &std::fs::FileType) -> Option<&'static str> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a FIFO");
        }
        if t.is_char_device() || t.is_block_device() {
            return Some("a device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    }
}
