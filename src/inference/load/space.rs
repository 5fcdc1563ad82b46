//! Checking free disk space before a download or a quantised copy is written, so a first start
//! on a small disk stops at once with what is needed, not after an hour with a full disk.

use std::path::{Path, PathBuf};

use super::LoadError;
use super::progress::bytes_words;

/// Space kept free beyond what is written: the rest of the system needs some too.
const MARGIN: u64 = 256 * 1024 * 1024;

/// Bytes free to an unprivileged writer on the file system holding `dir` (or its nearest
/// existing parent, for a folder not made yet).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut at: PathBuf = dir.to_path_buf();
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p.to_path_buf(),
            _ => {
                at = PathBuf::from(".");
                break;
            }
        }
    }
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs buffer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuses, naming the sizes, when `needed` bytes for `what` do not fit in `dir`.
pub fn ensure_room(dir: &Path, needed: u64, what: &str) -> Result<(), LoadError> {
    let free = match free_bytes(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "cannot tell the free disk space: {e}");
            return Ok(());
        }
    };
    if needed.saturating_add(MARGIN) > free {
        return Err(LoadError::NoSpace {
            dir: dir.to_path_buf(),
            what: what.to_string(),
            needed: bytes_words(needed),
            free: bytes_words(free),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_for_a_folder_not_made_yet_and_too_much_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(&dir.path().join("a/b/c")).unwrap();
        assert!(free > 0);
        ensure_room(dir.path(), 1, "a small file").unwrap();
        let err = ensure_room(dir.path(), free * 2, "the model").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("the model needs"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }
}
