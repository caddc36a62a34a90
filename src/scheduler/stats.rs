//! Counters the scheduler publishes for monitoring and for tests that must prove requests
//! really shared steps (rather than passing by running one after another).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[derive(Default)]
pub struct Stats {
    running_requests: AtomicUsize,
    running_sequences: AtomicUsize,
    steps: AtomicUsize,
    /// Steps where one request's prefill ran together with other requests' decode.
    mixed_steps: AtomicUsize,
    max_step_sequences: AtomicUsize,
    max_running_requests: AtomicUsize,
    completed: AtomicUsize,
    cancelled: AtomicUsize,
    /// Submits refused because the admission queue was full.
    rejected: AtomicUsize,
    /// Panics the scheduler contained (in its loop, an admission, a release).
    internal_faults: AtomicUsize,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StatsSnapshot {
    pub running_requests: usize,
    pub running_sequences: usize,
    pub queued_requests: usize,
    pub steps: usize,
    pub mixed_steps: usize,
    pub max_step_sequences: usize,
    pub max_running_requests: usize,
    pub completed: usize,
    pub cancelled: usize,
    pub rejected: usize,
    pub internal_faults: usize,
}

impl Stats {
    pub fn set_load(&self, requests: usize, sequences: usize) {
        self.running_requests.store(requests, Relaxed);
        self.running_sequences.store(sequences, Relaxed);
        self.max_running_requests.fetch_max(requests, Relaxed);
    }

    pub fn steps(&self) -> usize {
        self.steps.load(Relaxed)
    }

    pub fn stepped(&self, sequences: usize, mixed: bool) {
        self.steps.fetch_add(1, Relaxed);
        if mixed {
            self.mixed_steps.fetch_add(1, Relaxed);
        }
        self.max_step_sequences.fetch_max(sequences, Relaxed);
    }

    pub fn completed(&self) {
        self.completed.fetch_add(1, Relaxed);
    }

    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    pub fn internal_fault(&self) {
        self.internal_faults.fetch_add(1, Relaxed);
    }

    pub fn reset_peaks(&self) {
        self.max_step_sequences.store(0, Relaxed);
        self.max_running_requests.store(0, Relaxed);
        self.mixed_steps.store(0, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            running_requests: self.running_requests.load(Relaxed),
            running_sequences: self.running_sequences.load(Relaxed),
            // Filled in by the scheduler, which counts queued requests itself.
            queued_requests: 0,
            steps: self.steps.load(Relaxed),
            mixed_steps: self.mixed_steps.load(Relaxed),
            max_step_sequences: self.max_step_sequences.load(Relaxed),
            max_running_requests: self.max_running_requests.load(Relaxed),
            completed: self.completed.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            internal_faults: self.internal_faults.load(Relaxed),
        }
    }
}
