//! Giving freed KV-cache memory back to the OS when the scheduler goes idle. glibc keeps freed
//! blocks of a few MB (a slot's cache) in its heaps after the first ones raise its mmap
//! threshold, so a burst of requests would otherwise leave the process's RSS high for good.

/// Returns free heap memory of every malloc arena to the OS (glibc); a no-op elsewhere.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
        // pointers from us and is safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}
