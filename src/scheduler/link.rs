//! The channel between one submitted request and its caller: per-step tokens (when streamed),
//! the final result, a cancel flag, and optionally a doorbell socket an event loop can watch
//! (asyncio's `add_reader`), so async callers need no thread per request.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

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
    #[cfg(unix)]
    bell: Option<(UnixStream, UnixStream)>,
}

impl Link {
    pub fn new(stream_steps: bool, doorbell: bool) -> Result<Self> {
        #[cfg(unix)]
        let bell = if doorbell {
            let pair = UnixStream::pair().and_then(|(ring, listen)| {
                ring.set_nonblocking(true)?;
                listen.set_nonblocking(true)?;
                Ok((ring, listen))
            });
            Some(pair.map_err(|e| Error::Internal(format!("cannot create the request's doorbell socket: {e}")))?)
        } else {
            None
        };
        #[cfg(not(unix))]
        if doorbell {
            return Err(Error::BackendUnavailable("async waiting needs a Unix platform".into()));
        }
        Ok(Link {
            inbox: Mutex::new(Inbox::default()),
            ready: Condvar::new(),
            cancelled: AtomicBool::new(false),
            stream_steps,
            #[cfg(unix)]
            bell,
        })
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        // The inbox is plain data; a panic while it was held cannot leave it half-written.
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ring(&self) {
        self.ready.notify_all();
        #[cfg(unix)]
        if let Some((ring, _)) = &self.bell {
            // A full socket already holds unread bytes, so the listener wakes anyway.
            let _ = (&*ring).write(&[1]);
        }
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

    /// Caller side, never blocks: empties the doorbell first, so a step pushed after this call
    /// rings it again.
    pub fn poll(&self) -> Events {
        #[cfg(unix)]
        if let Some((_, listen)) = &self.bell {
            let mut buf = [0u8; 256];
            loop {
                match (&*listen).read(&mut buf) {
                    Ok(n) if n > 0 => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    _ => break,
                }
            }
        }
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

    /// The socket an event loop watches for readability, when the request has a doorbell.
    #[cfg(unix)]
    pub fn doorbell_fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        self.bell.as_ref().map(|(_, listen)| listen.as_raw_fd())
    }

    #[cfg(not(unix))]
    pub fn doorbell_fd(&self) -> Option<i32> {
        None
    }
}
