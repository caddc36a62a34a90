//! Fallible allocation for buffers sized by a model file or a request. `vec![..; n]` and
//! `Vec::with_capacity(n)` abort the whole process when the allocator says no; these return
//! `AllocFailed` instead, which callers turn into `Error::OutOfMemory` with a message that names
//! the bytes and the fix.

use std::alloc::Layout;

use crate::error::Error;

/// An allocation the allocator refused. `bytes` is None when the size does not even fit a usize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocFailed {
    pub bytes: Option<usize>,
}

impl AllocFailed {
    fn of<T>(n: usize) -> Self {
        AllocFailed { bytes: n.checked_mul(std::mem::size_of::<T>()) }
    }

    /// "`what` needs X GiB, which cannot be reserved; `fix`".
    pub fn into_error(self, what: &str, fix: &str) -> Error {
        let size = match self.bytes {
            Some(b) => format_bytes(b),
            None => "more bytes than this machine can address".to_string(),
        };
        Error::out_of_memory(format!("{what} needs {size}, which cannot be reserved; {fix}"))
    }
}

/// Human-readable size with the exact byte count (messages about memory).
pub fn format_bytes(bytes: usize) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB ({bytes} bytes)", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB ({bytes} bytes)", b / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Types for which all-zero bytes are a valid value, so zeroed memory from the allocator is an
/// initialized buffer.
///
/// # Safety
/// Implement only for plain-old-data types whose all-zero bit pattern is a valid value.
pub unsafe trait Zeroable: Copy {}
// SAFETY: all-zero bits are 0 / +0.0 for each of these.
unsafe impl Zeroable for f32 {}
unsafe impl Zeroable for u8 {}
unsafe impl Zeroable for half::bf16 {}
unsafe impl Zeroable for half::f16 {}

/// `n` zeroed values, like `vec![0; n]`: memory comes from `alloc_zeroed` (calloc), so pages are
/// only committed when written, as with `vec!` (KV caches rely on that).
pub fn try_zeroed<T: Zeroable>(n: usize) -> Result<Vec<T>, AllocFailed> {
    let layout = Layout::array::<T>(n).map_err(|_| AllocFailed::of::<T>(n))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(AllocFailed::of::<T>(n));
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `[T; n]`, which is what a
    // Vec of capacity n uses; zeroed bytes are valid `T` (Zeroable), so all n values are initialized.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// An empty Vec with room for exactly `n` values.
pub fn try_with_capacity<T>(n: usize) -> Result<Vec<T>, AllocFailed> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| AllocFailed::of::<T>(n))?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_allocations_fail_without_aborting() {
        assert!(try_zeroed::<f32>(1 << 60).is_err());
        assert_eq!(try_zeroed::<f32>(usize::MAX).unwrap_err().bytes, None);
        // 2^50 bytes: a valid layout, beyond the 47-bit user address space even with overcommit.
        assert_eq!(try_zeroed::<u8>(1 << 50).unwrap_err().bytes, Some(1 << 50));
        assert!(try_with_capacity::<u64>(1 << 58).is_err());
        let msg = AllocFailed { bytes: Some(3 << 30) }.into_error("the thing", "ask for less").to_string();
        assert_eq!(msg, "the thing needs 3.00 GiB (3221225472 bytes), which cannot be reserved; ask for less");
    }

    #[test]
    fn zeroed_buffers_are_zero() {
        let v = try_zeroed::<f32>(1000).unwrap();
        assert_eq!((v.len(), v.capacity()), (1000, 1000));
        assert!(v.iter().all(|&x| x == 0.0));
        assert!(try_zeroed::<u8>(0).unwrap().is_empty());
        assert_eq!(try_with_capacity::<f32>(7).unwrap().capacity(), 7);
    }
}
