//! Heap settings for a process that runs a model: each step of a long prompt allocates and
//! frees buffers of a few megabytes (activations, attention scores). glibc's defaults give each
//! of those its own `mmap`, so every step faults and zeroes fresh pages; measured on a 512-token
//! prompt that was about a tenth of the prefill time. Kept in the heap instead, they are reused
//! from one layer and step to the next, and resident memory after a reply stays the same.

/// Allocations up to this size come from the heap (glibc's largest allowed threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;

/// Free memory at the top of the heap kept for reuse before it is given back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 256 * 1024 * 1024;

/// Applies the settings above; returns whether the allocator took them (only glibc has them).
/// Call once at start-up, before other threads allocate.
pub fn tune_for_inference() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::tune_for_inference());
    }
}
