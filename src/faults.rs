//! Test-only fault injection: a panic at a named point of the serving path, triggered by a
//! marker token in the work at hand, so tests can prove that a fault ends only the requests it
//! should and that the generator keeps serving. Disarmed it costs one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// The scheduler admitting a request whose prompt holds the marker.
    Admit,
    /// A backend step whose input tokens hold the marker (after the step took its caches).
    Step,
    /// The scheduler releasing the cache slots of a request whose prompt holds the marker.
    Release,
    /// The scheduler's loop itself, outside any one request's part, while a request whose
    /// prompt holds the marker runs.
    Loop,
}

const POINTS: [(&str, FaultPoint); 4] = [
    ("admit", FaultPoint::Admit),
    ("step", FaultPoint::Step),
    ("release", FaultPoint::Release),
    ("loop", FaultPoint::Loop),
];

/// Per point: marker token + 1, or 0 when disarmed.
static ARMED: [AtomicU64; 4] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

fn slot(point: FaultPoint) -> &'static AtomicU64 {
    &ARMED[point as usize]
}

pub fn parse(name: &str) -> Result<FaultPoint> {
    POINTS.iter().find(|(n, _)| *n == name).map(|(_, p)| *p).ok_or_else(|| {
        Error::invalid(format!("fault point {name:?} does not exist; use one of \"admit\", \"step\", \"release\", \"loop\""))
    })
}

/// Arms `point` to panic when `marker` appears (None disarms it).
pub fn arm(point: FaultPoint, marker: Option<u32>) {
    slot(point).store(marker.map_or(0, |m| m as u64 + 1), Relaxed);
}

/// Panics when `point` is armed and its marker is among `tokens`.
pub fn check(point: FaultPoint, tokens: impl IntoIterator<Item = u32>) {
    let armed = slot(point).load(Relaxed);
    if armed == 0 {
        return;
    }
    let marker = (armed - 1) as u32;
    if tokens.into_iter().any(|t| t == marker) {
        panic!("injected fault at {point:?} (marker token {marker})");
    }
}
