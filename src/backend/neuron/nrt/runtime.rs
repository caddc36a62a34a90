//! The process's Neuron runtime: `nrt_init` once for every executor of the process, `nrt_close`
//! when the last one is gone. Every handle (model, tensor, set) holds an `Arc<Session>`, so the
//! close can only happen after every handle of every executor has been freed.

use std::sync::{Arc, Mutex};

use super::ffi::{self, Api, NRT_FRAMEWORK_TYPE_NO_FW};
use super::status::{self, Site};
use crate::error::{Error, Result};

pub const VISIBLE_CORES: &str = "NEURON_RT_VISIBLE_CORES";

struct Global {
    /// Live sessions; nrt_init ran iff this is > 0.
    sessions: usize,
    /// NeuronCores the initialised runtime can use.
    cores: usize,
    /// The NEURON_RT_VISIBLE_CORES value kvgen set itself (so a later open may widen it).
    ours: Option<String>,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global { sessions: 0, cores: 0, ours: None });

/// One executor's share of the initialised runtime.
pub struct Session {
    pub api: &'static Api,
}

impl Session {
    /// Opens libnrt and initialises it for ranks `0..tp_degree` (NeuronCores 0..tp-1).
    pub fn open(tp_degree: usize) -> Result<Arc<Session>> {
        if tp_degree == 0 {
            return Err(Error::invalid("tp_degree must be at least 1"));
        }
        let api = ffi::api()?;
        let mut g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
        if g.sessions > 0 {
            if tp_degree > g.cores {
                return Err(Error::BackendUnavailable(format!(
                    "the Neuron runtime of this process was started for {} NeuronCores; tp_degree={tp_degree} \
                     needs {tp_degree}: close the other Neuron generators first",
                    g.cores
                )));
            }
            g.sessions += 1;
            return Ok(Arc::new(Session { api }));
        }
        // Allowed before nrt_init; says how many cores this process may claim.
        let mut visible = 0u32;
        // SAFETY: writes one u32.
        let code = unsafe { (api.get_visible_vnc_count)(&mut visible) };
        status::check(code, &Site { call: "nrt_get_visible_vnc_count", rank: 0, what: "before nrt_init" })?;
        let visible = visible as usize;
        if visible < tp_degree {
            return Err(Error::BackendUnavailable(format!(
                "libnrt sees {visible} NeuronCores; tp_degree={tp_degree} needs {tp_degree} (library {}; check \
                 {VISIBLE_CORES} and that no other process holds the cores)",
                api.path
            )));
        }
        // The runtime claims its cores at nrt_init: ask for exactly ranks 0..tp-1 unless the user
        // chose the cores (then ranks index into their set, which starts at 0 too).
        let current = std::env::var(VISIBLE_CORES).ok();
        let user_set = current.is_some() && current != g.ours;
        let cores = if user_set {
            visible
        } else {
            let range = if tp_degree == 1 { "0".to_string() } else { format!("0-{}", tp_degree - 1) };
            // Set while holding the runtime lock and before libnrt's threads exist.
            std::env::set_var(VISIBLE_CORES, &range);
            g.ours = Some(range);
            tp_degree
        };
        // SAFETY: empty C strings for the framework versions, as the runtime's guide does.
        let code = unsafe { (api.init)(NRT_FRAMEWORK_TYPE_NO_FW, c"".as_ptr(), c"".as_ptr()) };
        status::check(code, &Site { call: "nrt_init", rank: 0, what: "starting the Neuron runtime" }).map_err(|e| {
            match e {
                Error::Backend(m) => Error::BackendUnavailable(format!("the Neuron runtime did not start: {m}")),
                other => other,
            }
        })?;
        g.sessions = 1;
        g.cores = cores;
        Ok(Arc::new(Session { api }))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
        g.sessions = g.sessions.saturating_sub(1);
        if g.sessions == 0 {
            // SAFETY: every handle holds an Arc<Session>, so none is alive any more.
            unsafe { (self.api.close)() };
        }
    }
}
