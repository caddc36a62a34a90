//! libnrt's C interface, declared by hand (the AWS headers carry no licence, so nothing is
//! vendored), and the library opened at run time: kvgen never links libnrt, so a build without
//! the Neuron SDK still loads and `device="neuron"` fails with a clear error instead.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;

use libloading::Library;

use crate::error::{Error, Result};

/// `NRT_STATUS` (a C enum: 32 bits on Linux x86-64).
pub type NrtStatus = u32;

/// Opaque `nrt_model_t`.
#[repr(C)]
pub struct NrtModel {
    _opaque: [u8; 0],
}

/// Opaque `nrt_tensor_t`.
#[repr(C)]
pub struct NrtTensor {
    _opaque: [u8; 0],
}

/// `nrt_tensor_set_t` is `void` in the C API.
pub type NrtTensorSet = c_void;

pub const NRT_FRAMEWORK_TYPE_NO_FW: u32 = 1;
pub const NRT_TENSOR_PLACEMENT_DEVICE: u32 = 0;
pub const NRT_TENSOR_USAGE_INPUT: u32 = 0;
pub const NRT_TENSOR_USAGE_OUTPUT: u32 = 1;

/// `nrt_tensor_info_t`.
#[repr(C)]
pub struct NrtTensorInfo {
    pub name: [c_char; 256],
    pub usage: u32,
    pub size: usize,
    pub dtype: u32,
    pub shape: *mut u32,
    pub ndim: u32,
}

/// `nrt_tensor_info_array_t`: a count followed by that many infos (a C flexible array member).
#[repr(C)]
pub struct NrtTensorInfoArray {
    pub tensor_count: u64,
    pub tensor_array: [NrtTensorInfo; 0],
}

/// `nrt_version_t`.
#[repr(C)]
pub struct NrtVersion {
    pub rt_major: u64,
    pub rt_minor: u64,
    pub rt_patch: u64,
    pub rt_maintenance: u64,
    pub rt_detail: [c_char; 128],
    pub git_hash: [c_char; 64],
}

// The layout libnrt was built with (x86-64); a wrong struct here would read garbage names/sizes.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<NrtTensorInfo>() == 296);
    assert!(std::mem::offset_of!(NrtTensorInfo, usage) == 256);
    assert!(std::mem::offset_of!(NrtTensorInfo, size) == 264);
    assert!(std::mem::offset_of!(NrtTensorInfo, dtype) == 272);
    assert!(std::mem::offset_of!(NrtTensorInfo, shape) == 280);
    assert!(std::mem::offset_of!(NrtTensorInfo, ndim) == 288);
    assert!(std::mem::offset_of!(NrtTensorInfoArray, tensor_array) == 8);
};

type InitFn = unsafe extern "C" fn(u32, *const c_char, *const c_char) -> NrtStatus;
type CloseFn = unsafe extern "C" fn();
type LoadCollectivesFn =
    unsafe extern "C" fn(*const c_void, usize, i32, i32, u32, u32, *mut *mut NrtModel) -> NrtStatus;
type UnloadFn = unsafe extern "C" fn(*mut NrtModel) -> NrtStatus;
type VisibleCountFn = unsafe extern "C" fn(*mut u32) -> NrtStatus;
type AllocateSetFn = unsafe extern "C" fn(*mut *mut NrtTensorSet) -> NrtStatus;
type DestroySetFn = unsafe extern "C" fn(*mut *mut NrtTensorSet);
type AddToSetFn = unsafe extern "C" fn(*mut NrtTensorSet, *const c_char, *mut NrtTensor) -> NrtStatus;
type ExecuteFn = unsafe extern "C" fn(*mut NrtModel, *const NrtTensorSet, *mut NrtTensorSet) -> NrtStatus;
type TensorAllocateFn = unsafe extern "C" fn(u32, c_int, usize, *const c_char, *mut *mut NrtTensor) -> NrtStatus;
type TensorFreeFn = unsafe extern "C" fn(*mut *mut NrtTensor);
type TensorReadFn = unsafe extern "C" fn(*const NrtTensor, *mut c_void, usize, usize) -> NrtStatus;
type TensorWriteFn = unsafe extern "C" fn(*mut NrtTensor, *const c_void, usize, usize) -> NrtStatus;
type GetTensorInfoFn = unsafe extern "C" fn(*mut NrtModel, *mut *mut NrtTensorInfoArray) -> NrtStatus;
type FreeTensorInfoFn = unsafe extern "C" fn(*mut NrtTensorInfoArray) -> NrtStatus;
type GetVersionFn = unsafe extern "C" fn(*mut NrtVersion, usize) -> NrtStatus;
type TensorMemsetFn = unsafe extern "C" fn(*mut NrtTensor, u64, c_int, usize) -> NrtStatus;
type StatusAsStrFn = unsafe extern "C" fn(NrtStatus) -> *const c_char;

/// Every libnrt entry point kvgen calls, resolved once.
pub struct Api {
    pub init: InitFn,
    pub close: CloseFn,
    pub load_collectives: LoadCollectivesFn,
    pub unload: UnloadFn,
    pub get_visible_vnc_count: VisibleCountFn,
    pub allocate_tensor_set: AllocateSetFn,
    pub destroy_tensor_set: DestroySetFn,
    pub add_tensor_to_tensor_set: AddToSetFn,
    pub execute: ExecuteFn,
    pub tensor_allocate: TensorAllocateFn,
    pub tensor_free: TensorFreeFn,
    pub tensor_read: TensorReadFn,
    pub tensor_write: TensorWriteFn,
    pub get_model_tensor_info: GetTensorInfoFn,
    pub free_model_tensor_info: FreeTensorInfoFn,
    pub get_version: Option<GetVersionFn>,
    pub tensor_memset: Option<TensorMemsetFn>,
    pub get_status_as_str: Option<StatusAsStrFn>,
    /// Where the library was found (for messages).
    pub path: String,
    // Kept so the function pointers above stay valid; the Api itself is leaked (never dlclosed).
    _lib: Library,
}

pub const ENV_OVERRIDE: &str = "KVGEN_LIBNRT";
pub const SDK_PATH: &str = "/opt/aws/neuron/lib/libnrt.so.1";
pub const SONAME: &str = "libnrt.so.1";

/// Candidates in search order: the override, the SDK's install path, the loader's search path.
pub fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(ENV_OVERRIDE).filter(|p| !p.is_empty()) {
        out.push(p.to_string_lossy().into_owned());
    }
    out.push(SDK_PATH.to_string());
    out.push(SONAME.to_string());
    out
}

// Success is cached for the process (handles from it may be alive anywhere); a failure is not, so
// a caller that fixes KVGEN_LIBNRT can try again.
static API: Mutex<Option<&'static Api>> = Mutex::new(None);

/// The process's libnrt, opened on first use.
pub fn api() -> Result<&'static Api> {
    let mut slot = API.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(api) = *slot {
        return Ok(api);
    }
    let api: &'static Api = Box::leak(Box::new(open()?));
    *slot = Some(api);
    Ok(api)
}

fn open() -> Result<Api> {
    let mut tried = Vec::new();
    for path in candidates() {
        // SAFETY: loading a shared library runs its initialisers; libnrt (or a test double
        // standing in for it) is the library the user pointed kvgen at.
        match unsafe { Library::new(&path) } {
            Ok(lib) => return resolve(lib, path),
            Err(e) => tried.push(format!("{path} ({e})")),
        }
    }
    Err(Error::BackendUnavailable(format!(
        "the Neuron runtime library libnrt was not found; tried: {}. Install the Neuron SDK (package \
         aws-neuronx-runtime-lib) or set {ENV_OVERRIDE} to the path of libnrt.so.1",
        tried.join("; ")
    )))
}

fn resolve(lib: Library, path: String) -> Result<Api> {
    let missing = |name: &str| {
        Error::BackendUnavailable(format!(
            "{path} has no symbol {name}: it is not a libnrt this kvgen can use (Neuron runtime 2.x needed)"
        ))
    };
    // SAFETY (both helpers): each symbol is read with the signature written above for it, which
    // follows libnrt's C declaration.
    unsafe fn req<T: Copy>(lib: &Library, name: &str) -> Option<T> {
        lib.get::<T>(name.as_bytes()).ok().map(|s| *s)
    }
    macro_rules! required {
        ($name:literal) => {
            unsafe { req(&lib, $name) }.ok_or_else(|| missing($name))?
        };
    }
    let get_visible_vnc_count = unsafe { req::<VisibleCountFn>(&lib, "nrt_get_visible_vnc_count") }
        .or_else(|| unsafe { req::<VisibleCountFn>(&lib, "nrt_get_visible_nc_count") })
        .ok_or_else(|| missing("nrt_get_visible_vnc_count (or nrt_get_visible_nc_count)"))?;
    Ok(Api {
        init: required!("nrt_init"),
        close: required!("nrt_close"),
        load_collectives: required!("nrt_load_collectives"),
        unload: required!("nrt_unload"),
        get_visible_vnc_count,
        allocate_tensor_set: required!("nrt_allocate_tensor_set"),
        destroy_tensor_set: required!("nrt_destroy_tensor_set"),
        add_tensor_to_tensor_set: required!("nrt_add_tensor_to_tensor_set"),
        execute: required!("nrt_execute"),
        tensor_allocate: required!("nrt_tensor_allocate"),
        tensor_free: required!("nrt_tensor_free"),
        tensor_read: required!("nrt_tensor_read"),
        tensor_write: required!("nrt_tensor_write"),
        get_model_tensor_info: required!("nrt_get_model_tensor_info"),
        free_model_tensor_info: required!("nrt_free_model_tensor_info"),
        get_version: unsafe { req(&lib, "nrt_get_version") },
        tensor_memset: unsafe { req(&lib, "nrt_tensor_memset") },
        get_status_as_str: unsafe { req(&lib, "nrt_get_status_as_str") },
        path,
        _lib: lib,
    })
}

impl Api {
    /// "major.minor.patch" of the runtime, when it exports `nrt_get_version`.
    pub fn version(&self) -> Option<String> {
        let f = self.get_version?;
        // SAFETY: an all-zero nrt_version_t is valid (integers and char arrays).
        let mut v: NrtVersion = unsafe { std::mem::zeroed() };
        // SAFETY: v is a writable nrt_version_t of the size passed.
        let status = unsafe { f(&mut v, std::mem::size_of::<NrtVersion>()) };
        (status == 0).then(|| format!("{}.{}.{}", v.rt_major, v.rt_minor, v.rt_patch))
    }

    /// The runtime's own text for a status, when it exports one.
    pub fn status_text(&self, code: NrtStatus) -> Option<String> {
        let f = self.get_status_as_str?;
        // SAFETY: returns a static NUL-terminated string or null.
        let p = unsafe { f(code) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated per the API.
        Some(unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// The NUL-terminated `name` of a tensor info, as text.
pub fn info_name(info: &NrtTensorInfo) -> String {
    let bytes: Vec<u8> = info.name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_info_layout_matches_libnrt() {
        assert_eq!(std::mem::size_of::<NrtTensorInfo>(), 296);
        assert_eq!(std::mem::offset_of!(NrtTensorInfo, name), 0);
        assert_eq!(std::mem::offset_of!(NrtTensorInfo, ndim), 288);
        assert_eq!(std::mem::size_of::<NrtVersion>(), 4 * 8 + 128 + 64);
    }

    #[test]
    fn search_order_puts_the_override_first() {
        // Read-only check of the fixed tail (the override depends on the environment).
        let c = candidates();
        assert_eq!(&c[c.len() - 2..], &[SDK_PATH.to_string(), SONAME.to_string()]);
    }

    #[test]
    fn info_name_stops_at_nul() {
        // SAFETY: all-zero is a valid nrt_tensor_info_t (null shape pointer, never read).
        let mut info: NrtTensorInfo = unsafe { std::mem::zeroed() };
        for (i, b) in b"logits".iter().enumerate() {
            info.name[i] = *b as c_char;
        }
        assert_eq!(info_name(&info), "logits");
    }
}
