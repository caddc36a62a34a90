//! nrt_double: a test double of libnrt (the Neuron runtime) for kvgen's tests.
//!
//! It exports the C symbols kvgen resolves, never runs a NEFF, and checks the contracts kvgen
//! must keep with the real runtime. A broken contract returns NRT_INVALID (2) and appends a
//! `VIOLATION: ...` line to the call log. Controls (environment, read when the call happens):
//!
//! - `NRT_DOUBLE_LOG`: file the call log is appended to (one line per call).
//! - `NRT_DOUBLE_CORES`: visible NeuronCores (default 2).
//! - `NRT_DOUBLE_BUDGET_BYTES`: device bytes per core; an allocation beyond → NRT_RESOURCE (4).
//! - `NRT_DOUBLE_PEER_TIMEOUT_MS`: how long a rank's load/execute waits for its peer ranks'
//!   (default 2000), else NRT_TIMEOUT (5).
//! - `NRT_DOUBLE_STALL_RANK=r`, `NRT_DOUBLE_STALL_MS` (default 4000): rank r's first execute
//!   after nrt_init sleeps that long, then returns success (its peers time out meanwhile).
//! - `NRT_DOUBLE_NUM_ERR=1`: the first execute after nrt_init returns 1003 (NaN on the device).
//!
//! A "NEFF" is a JSON document: `{"tensors": [{"name", "usage": "input"|"output", "size",
//! "dtype", "shape"}]}`, which nrt_get_model_tensor_info reports back.
//!
//! Contracts checked: nrt_init before anything but version/visible-count; vnc in range; ranks
//! of one NEFF loaded and executed concurrently; every model tensor bound by name in the sets,
//! with the model's byte size and on the model's core; a cache (an output named like an input
//! minus `.must_alias_input`) bound to the same tensor in both sets; no tensor freed while a set
//! binds it; no model unloaded while executing; nrt_close only when nothing is left.

#![allow(clippy::missing_safety_doc)]

mod json;

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const SUCCESS: u32 = 0;
const INVALID: u32 = 2;
const RESOURCE: u32 = 4;
const TIMEOUT: u32 = 5;
const NUM_ERR: u32 = 1003;
const MUST_ALIAS: &str = ".must_alias_input";

#[derive(Clone)]
struct Info {
    name: String,
    input: bool,
    size: usize,
    dtype: u32,
    shape: Vec<u32>,
}

struct TensorRec {
    vnc: i32,
    name: String,
    data: Vec<u8>,
}

struct ModelRec {
    vnc: i32,
    rank: u32,
    group: (u64, u32),
    infos: Vec<Info>,
    executing: u32,
}

#[derive(Default)]
struct SetRec {
    binds: Vec<(String, usize)>,
}

#[derive(Default)]
struct Group {
    world: u32,
    loaded: Vec<u32>,
    /// Executes started, per rank.
    started: HashMap<u32, u64>,
}

/// A tensor-info array handed out: its allocation and the shape arrays it points at.
type InfoAlloc = (std::alloc::Layout, Vec<Box<[u32]>>);

#[derive(Default)]
struct State {
    initialized: bool,
    tensors: HashMap<usize, Box<TensorRec>>,
    models: HashMap<usize, Box<ModelRec>>,
    sets: HashMap<usize, Box<SetRec>>,
    infos: HashMap<usize, InfoAlloc>,
    used: HashMap<i32, usize>,
    groups: HashMap<(u64, u32), Group>,
    loads: HashMap<(u64, u32), u32>,
    num_err_done: bool,
    stall_done: bool,
}

fn state() -> MutexGuard<'static, State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(State::default())).lock().unwrap_or_else(|p| p.into_inner())
}

fn wake() -> &'static Condvar {
    static C: OnceLock<Condvar> = OnceLock::new();
    C.get_or_init(Condvar::new)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn log(line: &str) {
    if let Some(path) = std::env::var_os("NRT_DOUBLE_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

fn violation(what: &str) -> u32 {
    log(&format!("VIOLATION: {what}"));
    eprintln!("nrt_double VIOLATION: {what}");
    INVALID
}

fn cstr(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: callers pass NUL-terminated strings (the C API's contract).
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

fn cores() -> i32 {
    env_u64("NRT_DOUBLE_CORES", 2) as i32
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

macro_rules! require_init {
    ($s:expr, $call:literal) => {
        if !$s.initialized {
            return violation(concat!($call, " before nrt_init (or after nrt_close)"));
        }
    };
}

// ---- init / close / discovery -------------------------------------------------------------

#[no_mangle]
pub extern "C" fn nrt_init(framework: u32, _fw: *const c_char, _fal: *const c_char) -> u32 {
    let mut s = state();
    let visible = std::env::var("NEURON_RT_VISIBLE_CORES").unwrap_or_default();
    log(&format!("nrt_init framework={framework} NEURON_RT_VISIBLE_CORES={visible}"));
    if s.initialized {
        return violation("nrt_init called twice without nrt_close");
    }
    s.initialized = true;
    s.num_err_done = false;
    s.stall_done = false;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nrt_close() {
    let mut s = state();
    log(&format!(
        "nrt_close live: tensors={} models={} sets={} infos={}",
        s.tensors.len(),
        s.models.len(),
        s.sets.len(),
        s.infos.len()
    ));
    if !s.initialized {
        violation("nrt_close without nrt_init");
        return;
    }
    if !(s.tensors.is_empty() && s.models.is_empty() && s.sets.is_empty() && s.infos.is_empty()) {
        violation("nrt_close while tensors, models, sets or tensor infos are still alive");
    }
    s.initialized = false;
    s.groups.clear();
    s.loads.clear();
}

#[no_mangle]
pub unsafe extern "C" fn nrt_get_visible_vnc_count(count: *mut u32) -> u32 {
    log(&format!("nrt_get_visible_vnc_count -> {}", cores()));
    if count.is_null() {
        return violation("nrt_get_visible_vnc_count(NULL)");
    }
    *count = cores().max(0) as u32;
    SUCCESS
}

#[repr(C)]
pub struct NrtVersion {
    rt_major: u64,
    rt_minor: u64,
    rt_patch: u64,
    rt_maintenance: u64,
    rt_detail: [c_char; 128],
    git_hash: [c_char; 64],
}

#[no_mangle]
pub unsafe extern "C" fn nrt_get_version(ver: *mut NrtVersion, size: usize) -> u32 {
    if ver.is_null() || size < std::mem::size_of::<NrtVersion>() {
        return violation("nrt_get_version with a short buffer");
    }
    std::ptr::write_bytes(ver, 0, 1);
    (*ver).rt_major = 2;
    (*ver).rt_minor = 99;
    for (i, b) in b"nrt_double".iter().enumerate() {
        (*ver).rt_detail[i] = *b as c_char;
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nrt_get_status_as_str(status: u32) -> *const c_char {
    let s: &'static CStr = match status {
        0 => c"success",
        2 => c"invalid (nrt_double contract violation)",
        4 => c"resource",
        5 => c"timeout",
        1003 => c"completed with numerical errors",
        _ => c"unknown",
    };
    s.as_ptr()
}

// ---- models -------------------------------------------------------------------------------

fn parse_neff(bytes: &[u8]) -> Result<Vec<Info>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let doc = json::parse(text)?;
    let list = doc.get("tensors").and_then(|t| t.as_arr()).ok_or("no \"tensors\" list")?;
    list.iter()
        .map(|t| {
            let name = t.get("name").and_then(|v| v.as_str()).ok_or("tensor without name")?.to_string();
            let input = match t.get("usage").and_then(|v| v.as_str()) {
                Some("input") => true,
                Some("output") => false,
                _ => return Err(format!("tensor {name}: usage must be \"input\" or \"output\"")),
            };
            let size = t.get("size").and_then(|v| v.as_u64()).ok_or(format!("tensor {name}: no size"))? as usize;
            let dtype = t.get("dtype").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
            let shape = t
                .get("shape")
                .and_then(|v| v.as_arr())
                .map(|a| a.iter().filter_map(|d| d.as_u64()).map(|d| d as u32).collect())
                .unwrap_or_default();
            Ok(Info { name, input, size, dtype, shape })
        })
        .collect()
}

#[no_mangle]
pub unsafe extern "C" fn nrt_load_collectives(
    neff: *const c_void,
    size: usize,
    vnc: i32,
    vnc_count: i32,
    ctx_device_id: u32,
    ctx_device_count: u32,
    model: *mut *mut c_void,
) -> u32 {
    let mut s = state();
    log(&format!(
        "nrt_load_collectives size={size} vnc={vnc} vnc_count={vnc_count} ctx_device_id={ctx_device_id} \
         ctx_device_count={ctx_device_count}"
    ));
    require_init!(s, "nrt_load_collectives");
    if neff.is_null() || model.is_null() {
        return violation("nrt_load_collectives with a NULL NEFF or model pointer");
    }
    if vnc < 0 || vnc >= cores() {
        return violation(&format!("nrt_load_collectives vnc={vnc} outside 0..{}", cores()));
    }
    if vnc_count != 1 && vnc_count != -1 {
        return violation(&format!("nrt_load_collectives vnc_count={vnc_count}, expected 1 or -1"));
    }
    if ctx_device_id >= ctx_device_count {
        return violation(&format!("ctx_device_id={ctx_device_id} >= ctx_device_count={ctx_device_count}"));
    }
    let bytes = std::slice::from_raw_parts(neff as *const u8, size);
    let infos = match parse_neff(bytes) {
        Ok(i) => i,
        Err(e) => return violation(&format!("nrt_load_collectives: not a test NEFF: {e}")),
    };
    // The k-th load of these bytes on each rank form one collective group.
    let hash = fnv(bytes);
    let occ = {
        let n = s.loads.entry((hash, ctx_device_id)).or_insert(0);
        *n += 1;
        *n
    };
    let key = (hash, occ);
    {
        let g = s.groups.entry(key).or_default();
        if g.loaded.contains(&ctx_device_id) {
            return violation(&format!("rank {ctx_device_id} loaded the same NEFF twice in one group"));
        }
        g.world = ctx_device_count;
        g.loaded.push(ctx_device_id);
        g.started.insert(ctx_device_id, 0);
    }
    wake().notify_all();
    // Ranks exchange information during load: wait for every peer of the group.
    let deadline = Instant::now() + Duration::from_millis(env_u64("NRT_DOUBLE_PEER_TIMEOUT_MS", 2000));
    while s.groups.get(&key).map(|g| (g.loaded.len() as u32) < g.world).unwrap_or(false) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log(&format!("nrt_load_collectives rank {ctx_device_id} -> NRT_TIMEOUT"));
            violation(&format!(
                "rank {ctx_device_id} loaded a collective NEFF while its peers did not (load ranks concurrently)"
            ));
            return TIMEOUT;
        }
        s = wake().wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
    }
    let rec = Box::new(ModelRec { vnc, rank: ctx_device_id, group: key, infos, executing: 0 });
    let ptr = &*rec as *const ModelRec as usize;
    s.models.insert(ptr, rec);
    *model = ptr as *mut c_void;
    log(&format!("nrt_load_collectives rank {ctx_device_id} -> model {ptr:#x}"));
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nrt_unload(model: *mut c_void) -> u32 {
    let mut s = state();
    log(&format!("nrt_unload model {:#x}", model as usize));
    require_init!(s, "nrt_unload");
    match s.models.get(&(model as usize)) {
        None => violation("nrt_unload of an unknown model"),
        Some(m) if m.executing > 0 => violation("nrt_unload while the model is executing"),
        Some(_) => {
            s.models.remove(&(model as usize));
            SUCCESS
        }
    }
}

#[repr(C)]
struct InfoC {
    name: [c_char; 256],
    usage: u32,
    size: usize,
    dtype: u32,
    shape: *mut u32,
    ndim: u32,
}

#[no_mangle]
pub unsafe extern "C" fn nrt_get_model_tensor_info(model: *mut c_void, out: *mut *mut c_void) -> u32 {
    let mut s = state();
    log("nrt_get_model_tensor_info");
    require_init!(s, "nrt_get_model_tensor_info");
    let Some(m) = s.models.get(&(model as usize)) else {
        return violation("nrt_get_model_tensor_info of an unknown model");
    };
    if out.is_null() {
        return violation("nrt_get_model_tensor_info(…, NULL)");
    }
    let infos = m.infos.clone();
    let item = std::mem::size_of::<InfoC>();
    let Ok(layout) = std::alloc::Layout::from_size_align(8 + item * infos.len().max(1), 8) else {
        return INVALID;
    };
    let base = std::alloc::alloc_zeroed(layout);
    if base.is_null() {
        return RESOURCE;
    }
    *(base as *mut u64) = infos.len() as u64;
    let mut shapes = Vec::new();
    for (i, info) in infos.iter().enumerate() {
        let c = &mut *(base.add(8 + i * item) as *mut InfoC);
        for (j, b) in info.name.bytes().take(255).enumerate() {
            c.name[j] = b as c_char;
        }
        c.usage = if info.input { 0 } else { 1 };
        c.size = info.size;
        c.dtype = info.dtype;
        let mut shape: Box<[u32]> = info.shape.clone().into_boxed_slice();
        c.shape = shape.as_mut_ptr();
        c.ndim = shape.len() as u32;
        shapes.push(shape);
    }
    s.infos.insert(base as usize, (layout, shapes));
    *out = base as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_free_model_tensor_info(info: *mut c_void) -> u32 {
    let mut s = state();
    log("nrt_free_model_tensor_info");
    match s.infos.remove(&(info as usize)) {
        Some((layout, _shapes)) => {
            std::alloc::dealloc(info as *mut u8, layout);
            SUCCESS
        }
        None => violation("nrt_free_model_tensor_info of an unknown array"),
    }
}

// ---- tensors ------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_allocate(
    placement: u32,
    vnc: c_int,
    size: usize,
    name: *const c_char,
    tensor: *mut *mut c_void,
) -> u32 {
    let mut s = state();
    let label = cstr(name).unwrap_or_default();
    log(&format!("nrt_tensor_allocate placement={placement} vnc={vnc} size={size} name={label}"));
    require_init!(s, "nrt_tensor_allocate");
    if placement != 0 {
        return violation(&format!("tensor {label}: placement {placement}, kvgen must use DEVICE (0)"));
    }
    if vnc < 0 || vnc >= cores() {
        return violation(&format!("tensor {label}: vnc={vnc} outside 0..{}", cores()));
    }
    if tensor.is_null() {
        return violation("nrt_tensor_allocate(…, NULL)");
    }
    let used = s.used.get(&vnc).copied().unwrap_or(0);
    if let Some(budget) = std::env::var("NRT_DOUBLE_BUDGET_BYTES").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        if used + size > budget {
            log(&format!("nrt_tensor_allocate {label} -> NRT_RESOURCE (core {vnc}: {used} + {size} > {budget} bytes)"));
            return RESOURCE;
        }
    }
    let rec = Box::new(TensorRec { vnc, name: label, data: vec![0u8; size] });
    let ptr = &*rec as *const TensorRec as usize;
    s.tensors.insert(ptr, rec);
    s.used.insert(vnc, used + size);
    *tensor = ptr as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_free(tensor: *mut *mut c_void) {
    let mut s = state();
    if tensor.is_null() {
        violation("nrt_tensor_free(NULL)");
        return;
    }
    let key = *tensor as usize;
    let name = s.tensors.get(&key).map(|t| t.name.clone());
    log(&format!("nrt_tensor_free {}", name.as_deref().unwrap_or("?")));
    if !s.initialized {
        violation("nrt_tensor_free after nrt_close");
    }
    let Some(rec) = s.tensors.remove(&key) else {
        violation("nrt_tensor_free of an unknown tensor (double free?)");
        return;
    };
    if s.sets.values().any(|set| set.binds.iter().any(|(_, t)| *t == key)) {
        violation(&format!("tensor {} freed while a tensor set still binds it (destroy sets first)", rec.name));
    }
    if let Some(u) = s.used.get_mut(&rec.vnc) {
        *u = u.saturating_sub(rec.data.len());
    }
    *tensor = std::ptr::null_mut();
}

fn span(s: &State, tensor: usize, offset: usize, size: usize, call: &str) -> Result<(), u32> {
    match s.tensors.get(&tensor) {
        None => Err(violation(&format!("{call} of an unknown tensor"))),
        Some(t) if offset.checked_add(size).is_none_or(|end| end > t.data.len()) => Err(violation(&format!(
            "{call} of tensor {}: bytes {offset}..{} outside its {} bytes",
            t.name,
            offset.saturating_add(size),
            t.data.len()
        ))),
        Some(_) => Ok(()),
    }
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_write(tensor: *mut c_void, buf: *const c_void, offset: usize, size: usize) -> u32 {
    let mut s = state();
    require_init!(s, "nrt_tensor_write");
    if let Err(code) = span(&s, tensor as usize, offset, size, "nrt_tensor_write") {
        return code;
    }
    if let Some(t) = s.tensors.get_mut(&(tensor as usize)) {
        log(&format!("nrt_tensor_write {} offset={offset} size={size}", t.name));
        if size > 0 {
            t.data[offset..offset + size].copy_from_slice(std::slice::from_raw_parts(buf as *const u8, size));
        }
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_read(tensor: *const c_void, buf: *mut c_void, offset: usize, size: usize) -> u32 {
    let s = state();
    require_init!(s, "nrt_tensor_read");
    if let Err(code) = span(&s, tensor as usize, offset, size, "nrt_tensor_read") {
        return code;
    }
    if let Some(t) = s.tensors.get(&(tensor as usize)) {
        log(&format!("nrt_tensor_read {} offset={offset} size={size}", t.name));
        if size > 0 {
            std::ptr::copy_nonoverlapping(t.data[offset..].as_ptr(), buf as *mut u8, size);
        }
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_tensor_memset(tensor: *mut c_void, offset: u64, value: c_int, size: usize) -> u32 {
    let mut s = state();
    require_init!(s, "nrt_tensor_memset");
    if let Err(code) = span(&s, tensor as usize, offset as usize, size, "nrt_tensor_memset") {
        return code;
    }
    if let Some(t) = s.tensors.get_mut(&(tensor as usize)) {
        log(&format!("nrt_tensor_memset {} value={value} size={size}", t.name));
        t.data[offset as usize..offset as usize + size].fill(value as u8);
    }
    SUCCESS
}

// ---- tensor sets --------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn nrt_allocate_tensor_set(set: *mut *mut c_void) -> u32 {
    let mut s = state();
    log("nrt_allocate_tensor_set");
    require_init!(s, "nrt_allocate_tensor_set");
    if set.is_null() {
        return violation("nrt_allocate_tensor_set(NULL)");
    }
    let rec = Box::<SetRec>::default();
    let ptr = &*rec as *const SetRec as usize;
    s.sets.insert(ptr, rec);
    *set = ptr as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nrt_destroy_tensor_set(set: *mut *mut c_void) {
    let mut s = state();
    log("nrt_destroy_tensor_set");
    if set.is_null() || s.sets.remove(&(*set as usize)).is_none() {
        violation("nrt_destroy_tensor_set of an unknown set");
        return;
    }
    if !s.initialized {
        violation("nrt_destroy_tensor_set after nrt_close");
    }
    *set = std::ptr::null_mut();
}

#[no_mangle]
pub unsafe extern "C" fn nrt_add_tensor_to_tensor_set(
    set: *mut c_void,
    name: *const c_char,
    tensor: *mut c_void,
) -> u32 {
    let mut s = state();
    let label = cstr(name).unwrap_or_default();
    log(&format!("nrt_add_tensor_to_tensor_set {label}"));
    require_init!(s, "nrt_add_tensor_to_tensor_set");
    if name.is_null() || !s.tensors.contains_key(&(tensor as usize)) {
        return violation(&format!("nrt_add_tensor_to_tensor_set {label}: NULL name or unknown tensor"));
    }
    let Some(rec) = s.sets.get_mut(&(set as usize)) else {
        return violation("nrt_add_tensor_to_tensor_set of an unknown set");
    };
    rec.binds.retain(|(n, _)| *n != label);
    rec.binds.push((label, tensor as usize));
    SUCCESS
}

// ---- execute ------------------------------------------------------------------------------

/// Every contract of one execute that can be checked without the peers.
fn check_sets(s: &State, m: &ModelRec, ins: usize, outs: usize) -> Result<Vec<String>, String> {
    let input = s.sets.get(&ins).ok_or("nrt_execute with an unknown input set")?;
    let output = s.sets.get(&outs).ok_or("nrt_execute with an unknown output set")?;
    let find = |set: &SetRec, name: &str| set.binds.iter().find(|(n, _)| n == name).map(|(_, t)| *t);
    for info in &m.infos {
        let (set, side) = if info.input { (input, "input") } else { (output, "output") };
        let t =
            find(set, &info.name).ok_or(format!("{side} {} of the model is not bound in the {side} set", info.name))?;
        let rec = s.tensors.get(&t).ok_or(format!("{side} {} is bound to a freed tensor", info.name))?;
        if rec.data.len() != info.size {
            return Err(format!(
                "{side} {} is bound to tensor {} of {} bytes; the model's tensor is {} bytes",
                info.name,
                rec.name,
                rec.data.len(),
                info.size
            ));
        }
        if rec.vnc != m.vnc {
            return Err(format!(
                "{side} {} is a tensor on core {}, the model is on core {}",
                info.name, rec.vnc, m.vnc
            ));
        }
    }
    for (set, side, want_input) in [(input, "input", true), (output, "output", false)] {
        for (name, _) in &set.binds {
            if !m.infos.iter().any(|i| i.input == want_input && &i.name == name) {
                return Err(format!("the {side} set binds {name}, which the model does not have"));
            }
        }
    }
    let mut aliased = Vec::new();
    for out in m.infos.iter().filter(|i| !i.input) {
        let alias = format!("{}{MUST_ALIAS}", out.name);
        if m.infos.iter().any(|i| i.input && i.name == alias) {
            if find(input, &alias) != find(output, &out.name) {
                return Err(format!(
                    "cache {}: the input {alias} and the output {} are bound to different tensors (must alias)",
                    out.name, out.name
                ));
            }
            aliased.push(out.name.clone());
        }
    }
    Ok(aliased)
}

#[no_mangle]
pub extern "C" fn nrt_execute(model: *mut c_void, input: *const c_void, output: *mut c_void) -> u32 {
    let mut s = state();
    require_init!(s, "nrt_execute");
    let key = model as usize;
    let Some(m) = s.models.get(&key) else {
        return violation("nrt_execute of an unknown model");
    };
    let (rank, vnc, group) = (m.rank, m.vnc, m.group);
    let aliased = match check_sets(&s, m, input as usize, output as usize) {
        Ok(a) => a,
        Err(e) => {
            log(&format!("nrt_execute vnc={vnc} rank={rank} -> NRT_INVALID"));
            return violation(&e);
        }
    };
    let stall_rank = std::env::var("NRT_DOUBLE_STALL_RANK").ok().and_then(|v| v.trim().parse::<u32>().ok());
    if let Some(m) = s.models.get_mut(&key) {
        m.executing += 1;
    }
    if stall_rank == Some(rank) && !s.stall_done {
        // A stuck rank: it reaches the collective only after the stall, so its peers time out.
        s.stall_done = true;
        log(&format!("nrt_execute vnc={vnc} rank={rank} stalling"));
        drop(s);
        std::thread::sleep(Duration::from_millis(env_u64("NRT_DOUBLE_STALL_MS", 4000)));
        s = state();
        log(&format!("nrt_execute vnc={vnc} rank={rank} stall over"));
    }
    let n = {
        let g = s.groups.entry(group).or_default();
        let c = g.started.entry(rank).or_insert(0);
        *c += 1;
        *c
    };
    wake().notify_all();
    log(&format!("nrt_execute vnc={vnc} rank={rank} exec={n} aliased={}", aliased.join(",")));
    let num_err = std::env::var("NRT_DOUBLE_NUM_ERR").is_ok_and(|v| v == "1") && !s.num_err_done;
    if num_err {
        s.num_err_done = true;
    }
    let mut code = SUCCESS;
    // A collective: every rank of the group must be inside its n-th execute.
    let deadline = Instant::now() + Duration::from_millis(env_u64("NRT_DOUBLE_PEER_TIMEOUT_MS", 2000));
    loop {
        let ready = s
            .groups
            .get(&group)
            .map(|g| g.started.len() as u32 >= g.world && g.started.values().all(|c| *c >= n))
            .unwrap_or(false);
        if ready {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log(&format!("nrt_execute vnc={vnc} rank={rank} exec={n} -> NRT_TIMEOUT (peers did not execute)"));
            if stall_rank.is_none() {
                violation(&format!("rank {rank} executed while its peer ranks did not (execute ranks concurrently)"));
            }
            code = TIMEOUT;
            break;
        }
        s = wake().wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
    }
    if code == SUCCESS && num_err {
        code = NUM_ERR;
    }
    if let Some(m) = s.models.get_mut(&key) {
        m.executing -= 1;
    }
    log(&format!("nrt_execute vnc={vnc} rank={rank} exec={n} -> {code}"));
    code
}
