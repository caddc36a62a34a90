//! The channel between one submitted request and its caller: per-step tokens (when streamed),
//! the final result, a cancel flag, and optionally a ticket on an event loop's shared doorbell
//! (see `doorbell`), so async callers need neither a thread nor a socket per request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::doorbell::Doorbell;
use crate::error::{Error, Result};
use crate::generation::GenerationOutput;

#[derive(Default)]
struct Inbox {
    steps: VecDeque<Vec<u32>>,
    result: Option<Result<GenerationOutput>>,
    finished: bool,
}

/// What a caller sees after waiting or polling: the steps since last time, and whether the
/// result is ready (all steps are delivered before it).
pub struct Events {
    pub steps: Vec<Vec<u32>>,
    pub finished: bool,
}

pub struct Link {
    inbox: Mutex<Inbox>,
    ready: Condvar,
    cancelled: AtomicBool,
    stream_steps: bool,
    bell: Option<(Arc<Doorbell>, u64)>,
}

impl Link {
    pub fn new(stream_steps: bool, doorbell: Option<Arc<Doorbell>>) -> Self {
        Link {
            inbox: Mutex::new(Inbox::default()),
            ready: Condvar::new(),
            cancelled: AtomicBool::new(false),
            stream_steps,
            bell: doorbell.map(|b| {
                let ticket = b.ticket();
                (b, ticket)
            }),
        }
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        // The inbox is plain data; a panic while it was held cannot leave it half-written.
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ring(&self) {
        self.ready.notify_all();
        if let Some((bell, ticket)) = &self.bell {
            bell.ring(*ticket);
        }
    }

    /// This request's ticket on its doorbell.
    pub fn ticket(&self) -> Option<u64> {
        self.bell.as_ref().map(|(_, t)| *t)
    }

    /// True once the result is in (or an error ended the request).
    pub fn is_finished(&self) -> bool {
        self.inbox().finished
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Scheduler side: one step's tokens (dropped unless the caller streams).
    pub fn push_step(&self, tokens: Vec<u32>) {
        if !self.stream_steps {
            return;
        }
        self.inbox().steps.push_back(tokens);
        self.ring();
    }

    /// Scheduler side: the outcome; later calls are ignored.
    pub fn finish(&self, result: Result<GenerationOutput>) {
        {
            let mut inbox = self.inbox();
            if inbox.finished {
                return;
            }
            inbox.result = Some(result);
            inbox.finished = true;
        }
        self.ring();
    }

    /// Caller side: waits up to `timeout` for a step or the result.
    pub fn wait(&self, timeout: Duration) -> Events {
        let mut inbox = self.inbox();
        if inbox.steps.is_empty() && !inbox.finished {
            inbox = match self.ready.wait_timeout(inbox, timeout) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        Self::drain(&mut inbox)
    }

    /// Caller side, never blocks.
    pub fn poll(&self) -> Events {
        Self::drain(&mut self.inbox())
    }

    fn drain(inbox: &mut Inbox) -> Events {
        Events { steps: inbox.steps.drain(..).collect(), finished: inbox.finished }
    }

    /// Caller side: the result, once; Err(Internal) before it is ready or when taken twice.
    pub fn take_result(&self) -> Result<GenerationOutput> {
        let mut inbox = self.inbox();
        match inbox.result.take() {
            Some(result) => result,
            None if inbox.finished => Err(Error::Internal("the request's result was already taken".into())),
            None => Err(Error::Internal("the request has not finished yet".into())),
        }
    }
}
