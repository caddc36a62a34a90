//! One socket an event loop watches for all of its requests: a request with news puts its ticket
//! in the ready set and writes a byte; the loop drains the socket and wakes the waiters whose
//! tickets it takes. One socket pair per event loop, not per request, so queued requests hold
//! no file descriptors.

use std::collections::HashSet;
#[cfg(unix)]
use std::io::{ErrorKind, Read, Write};
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

pub struct Doorbell {
    #[cfg(unix)]
    ring: UnixStream,
    #[cfg(unix)]
    listen: UnixStream,
    /// Tickets of requests with news since the last `take_ready`; a set, so a loop that stops
    /// draining holds at most one entry per live request.
    ready: Mutex<HashSet<u64>>,
    next_ticket: AtomicU64,
}

impl Doorbell {
    #[cfg(unix)]
    pub fn new() -> Result<Self> {
        let (ring, listen) = UnixStream::pair()
            .and_then(|(ring, listen)| {
                ring.set_nonblocking(true)?;
                listen.set_nonblocking(true)?;
                Ok((ring, listen))
            })
            .map_err(|e| Error::Internal(format!("cannot create the event loop's doorbell socket: {e}")))?;
        Ok(Doorbell { ring, listen, ready: Mutex::new(HashSet::new()), next_ticket: AtomicU64::new(1) })
    }

    #[cfg(not(unix))]
    pub fn new() -> Result<Self> {
        Err(Error::BackendUnavailable("async waiting needs a Unix platform".into()))
    }

    fn ready(&self) -> MutexGuard<'_, HashSet<u64>> {
        // A set of integers cannot be left half-updated by a panic.
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh ticket for one request.
    pub fn ticket(&self) -> u64 {
        self.next_ticket.fetch_add(1, Ordering::Relaxed)
    }

    /// Marks `ticket` ready and wakes the loop.
    pub fn ring(&self, ticket: u64) {
        self.ready().insert(ticket);
        #[cfg(unix)]
        {
            // A full socket already holds unread bytes, so the listener wakes anyway.
            let _ = (&self.ring).write(&[1]);
        }
    }

    /// Empties the socket, then returns the tickets rung since the last call (a ring after the
    /// drain rings the socket again, so none is lost).
    pub fn take_ready(&self) -> Vec<u64> {
        #[cfg(unix)]
        {
            let mut buf = [0u8; 512];
            loop {
                match (&self.listen).read(&mut buf) {
                    Ok(n) if n > 0 => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    _ => break,
                }
            }
        }
        self.ready().drain().collect()
    }

    /// The descriptor to watch for readability.
    #[cfg(unix)]
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.listen.as_raw_fd()
    }

    #[cfg(not(unix))]
    pub fn fd(&self) -> i32 {
        -1
    }
}
