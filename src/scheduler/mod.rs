//! Continuous batching: one worker thread owns the model step loop. Requests submitted from any
//! thread wait in a FIFO queue, join the running batch at the next step (their prefill in the
//! same backend step as the others' decode) while the limits on concurrent sequences and cache
//! positions allow, and free their cache slots as soon as they finish or are cancelled.
//!
//! Results do not depend on who else is in the batch: the CPU kernels are batch-invariant and
//! every row keeps its own processors and random stream. The one exception, dynamic NTK RoPE
//! (whose frequencies follow the longest sequence in a step), is run one request per step.

pub mod link;
mod stats;
mod trim;

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rayon::prelude::*;

use crate::backend::{Backend, SeqInput, SlotId};
use crate::error::{Error, Result};
use crate::generation::{GenerationOutput, Request};
pub use link::{Events, Link};
pub use stats::StatsSnapshot;
use stats::Stats;

/// Bounds on what runs at once; requests beyond them wait. A request larger than the bounds
/// by itself still runs, alone, when nothing else does.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences (rows) decoding together.
    pub max_sequences: usize,
    /// KV-cache positions reserved together (each row reserves prompt + max_new_tokens).
    pub max_cache_positions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_sequences: 64, max_cache_positions: 1 << 20 }
    }
}

/// A cache slot that goes back to the backend when dropped (finish, error, cancel).
struct OwnedSlot {
    backend: Arc<dyn Backend>,
    slot: SlotId,
}

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        self.backend.release(self.slot);
    }
}

struct Waiting {
    request: Request,
    link: Arc<Link>,
}

struct Running {
    request: Request,
    slots: Vec<OwnedSlot>,
    link: Arc<Link>,
}

#[derive(Default)]
struct Queue {
    incoming: VecDeque<Waiting>,
    limits: Limits,
    paused: bool,
    /// Pause once the step counter reaches this (tests: hold a request mid-generation). An
    /// absolute count, so a step that was already under way when the pause was asked for does
    /// not count towards it.
    pause_at_step: Option<usize>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: Stats,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Scheduler {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

/// The caller's end of a submitted request. Dropping it cancels the request.
pub struct RequestHandle {
    link: Arc<Link>,
    shared: Arc<Shared>,
}

impl RequestHandle {
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Stops the request at the scheduler's next step and frees its slots; its result becomes
    /// `Error::Cancelled` unless it had already finished.
    pub fn cancel(&self) {
        self.link.cancel();
        // Take the queue lock so the worker cannot miss the wakeup between its check and its wait.
        drop(self.shared.queue());
        self.shared.wake.notify_all();
    }

    /// Blocks until the request ends, calling `on_steps` with each batch of streamed steps and
    /// every `poll` to let the caller stop it (Err cancels and is returned).
    pub fn wait(
        &self,
        poll: Duration,
        mut on_steps: impl FnMut(Vec<Vec<u32>>) -> Result<()>,
    ) -> Result<GenerationOutput> {
        loop {
            let events = self.link.wait(poll);
            if let Err(e) = on_steps(events.steps) {
                self.cancel();
                return Err(e);
            }
            if events.finished {
                return self.link.take_result();
            }
        }
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Scheduler {
    /// Starts the worker thread. `isolate_requests` runs each request in its own backend step
    /// (for models whose step arithmetic depends on the batch).
    pub fn start(backend: Arc<dyn Backend>, limits: Limits, isolate_requests: bool) -> Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { limits, ..Default::default() }),
            wake: Condvar::new(),
            stats: Stats::default(),
        });
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("kvgen-scheduler".into())
            .spawn(move || Worker { shared: worker_shared, backend, isolate_requests }.run())
            .map_err(|e| Error::Internal(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Scheduler { shared, worker: Some(worker) })
    }

    /// Queues a request; it joins the batch at the next step the limits allow.
    pub fn submit(&self, request: Request, stream_steps: bool, doorbell: bool) -> Result<RequestHandle> {
        let link = Arc::new(Link::new(stream_steps, doorbell)?);
        let handle = RequestHandle { link: Arc::clone(&link), shared: Arc::clone(&self.shared) };
        if request.is_done() {
            link.finish(Ok(request.into_output()));
            return Ok(handle);
        }
        {
            let mut queue = self.shared.queue();
            if queue.shutdown {
                return Err(Error::Internal("the scheduler has shut down".into()));
            }
            queue.incoming.push_back(Waiting { request, link });
            self.shared.stats.queued(queue.incoming.len());
        }
        self.shared.wake.notify_all();
        Ok(handle)
    }

    pub fn limits(&self) -> Limits {
        self.shared.queue().limits
    }

    pub fn set_limits(&self, limits: Limits) -> Result<()> {
        if limits.max_sequences == 0 || limits.max_cache_positions == 0 {
            return Err(Error::invalid(format!(
                "max_sequences={} and max_cache_tokens={} must both be at least 1",
                limits.max_sequences, limits.max_cache_positions
            )));
        }
        self.shared.queue().limits = limits;
        self.shared.wake.notify_all();
        Ok(())
    }

    /// While paused the worker admits and steps nothing (requests queue up): lets tests line up
    /// many requests and release them into one step. `after_steps` runs that many steps first.
    pub fn set_paused(&self, paused: bool, after_steps: Option<usize>) {
        {
            let mut queue = self.shared.queue();
            queue.paused = paused && after_steps.unwrap_or(0) == 0;
            let now = self.shared.stats.steps();
            queue.pause_at_step = if paused { after_steps.filter(|&n| n > 0).map(|n| now + n) } else { None };
        }
        self.shared.wake.notify_all();
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    pub fn reset_peaks(&self) {
        self.shared.stats.reset_peaks();
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.queue().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    backend: Arc<dyn Backend>,
    isolate_requests: bool,
}

impl Worker {
    fn run(self) {
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        loop {
            let limits = {
                let mut queue = self.shared.queue();
                loop {
                    waiting.extend(queue.incoming.drain(..));
                    drop_cancelled(&mut waiting, &mut running, &self.shared.stats);
                    if queue.shutdown {
                        for w in waiting.drain(..) {
                            w.link.finish(Err(Error::Internal("the engine shut down".into())));
                        }
                        for r in running.drain(..) {
                            r.link.finish(Err(Error::Internal("the engine shut down".into())));
                        }
                        return;
                    }
                    if queue.pause_at_step.is_some_and(|at| self.shared.stats.steps() >= at) {
                        queue.paused = true;
                        queue.pause_at_step = None;
                    }
                    let has_work = !running.is_empty() || !waiting.is_empty();
                    if has_work && !queue.paused {
                        break queue.limits;
                    }
                    self.publish(&waiting, &running);
                    queue = match self.shared.wake.wait(queue) {
                        Ok(q) => q,
                        Err(p) => p.into_inner(),
                    };
                }
            };
            self.admit(&mut waiting, &mut running, limits);
            self.publish(&waiting, &running);
            if !running.is_empty() {
                running = self.step(running);
                if running.is_empty() && waiting.is_empty() {
                    self.publish(&waiting, &running);
                    trim::return_freed_memory();
                }
            }
        }
    }

    fn publish(&self, waiting: &VecDeque<Waiting>, running: &[Running]) {
        let rows: usize = running.iter().map(|r| r.request.rows()).sum();
        self.shared.stats.set_load(running.len(), rows, waiting.len());
    }

    /// Moves queued requests into the batch in arrival order while they fit.
    fn admit(&self, waiting: &mut VecDeque<Waiting>, running: &mut Vec<Running>, limits: Limits) {
        let mut rows: usize = running.iter().map(|r| r.request.rows()).sum();
        let mut positions: usize = running.iter().map(|r| r.request.cache_positions()).sum();
        while let Some(next) = waiting.front() {
            let (need_rows, need_positions) = (next.request.rows(), next.request.cache_positions());
            let fits = rows + need_rows <= limits.max_sequences && positions + need_positions <= limits.max_cache_positions;
            if !fits && !running.is_empty() {
                break;
            }
            let Some(Waiting { request, link }) = waiting.pop_front() else { break };
            match self.allocate(&request) {
                Ok(slots) => {
                    rows += need_rows;
                    positions += need_positions;
                    running.push(Running { request, slots, link });
                }
                Err(e) => link.finish(Err(e)),
            }
        }
    }

    fn allocate(&self, request: &Request) -> Result<Vec<OwnedSlot>> {
        (0..request.rows())
            .map(|r| {
                let slot = self.backend.allocate(request.slot_capacity(r))?;
                Ok(OwnedSlot { backend: Arc::clone(&self.backend), slot })
            })
            .collect()
    }

    /// One step of every running request; returns those still running.
    fn step(&self, mut running: Vec<Running>) -> Vec<Running> {
        let outcomes = if self.isolate_requests {
            running.iter().map(|r| self.forward(std::slice::from_ref(r))).collect()
        } else {
            match self.forward(&running) {
                Ok(logits) => split_logits(logits, &running),
                // Rerun each alone, so a failure lands on the request that caused it.
                Err(_) => running.iter().map(|r| self.forward(std::slice::from_ref(r))).collect(),
            }
        };
        let sequences: usize = running.iter().map(|r| r.request.step_inputs().len()).sum();
        let prefills = running.iter().filter(|r| r.request.is_prefill()).count();
        self.shared.stats.stepped(sequences, prefills > 0 && prefills < running.len());

        let advanced: Vec<Result<Vec<u32>>> = running
            .par_iter_mut()
            .zip(outcomes)
            .map(|(r, logits)| {
                let logits = logits?;
                catch_unwind(AssertUnwindSafe(|| r.request.advance(&logits)))
                    .unwrap_or_else(|_| Err(Error::Internal("a panic while processing a step".into())))
            })
            .collect();
        let mut still = Vec::with_capacity(running.len());
        for (r, outcome) in running.into_iter().zip(advanced) {
            match outcome {
                Ok(tokens) => {
                    r.link.push_step(tokens);
                    if r.request.is_done() {
                        let Running { request, slots, link } = r;
                        drop(slots); // free the cache before the caller hears back
                        link.finish(Ok(request.into_output()));
                        self.shared.stats.completed();
                    } else {
                        still.push(r);
                    }
                }
                Err(e) => {
                    let Running { slots, link, .. } = r;
                    drop(slots);
                    link.finish(Err(e));
                    self.shared.stats.completed();
                }
            }
        }
        still
    }

    /// One backend step over `batch`; the logits of all their step rows, in order.
    fn forward(&self, batch: &[Running]) -> Result<Vec<f32>> {
        let seqs: Vec<SeqInput> = batch
            .iter()
            .flat_map(|r| {
                r.request.step_inputs().into_iter().map(|i| SeqInput {
                    slot: r.slots[i.row].slot,
                    tokens: i.tokens,
                    start_pos: i.start_pos,
                })
            })
            .collect();
        catch_unwind(AssertUnwindSafe(|| self.backend.step(&seqs, false)))
            .unwrap_or_else(|_| Err(Error::Internal("a panic in the backend step".into())))
    }
}

/// Cuts one combined step's logits into each request's share.
fn split_logits(logits: Vec<f32>, running: &[Running]) -> Vec<Result<Vec<f32>>> {
    let total_rows: usize = running.iter().map(|r| r.request.step_inputs().len()).sum();
    if total_rows == 0 || logits.len() % total_rows != 0 {
        let msg = format!("the backend returned {} logits for {total_rows} rows", logits.len());
        return running.iter().map(|_| Err(Error::Internal(msg.clone()))).collect();
    }
    let vocab = logits.len() / total_rows;
    let mut offset = 0;
    running
        .iter()
        .map(|r| {
            let n = r.request.step_inputs().len() * vocab;
            let share = logits[offset..offset + n].to_vec();
            offset += n;
            Ok(share)
        })
        .collect()
}

fn drop_cancelled(waiting: &mut VecDeque<Waiting>, running: &mut Vec<Running>, stats: &Stats) {
    for w in extract(waiting, |w| w.link.is_cancelled()) {
        w.link.finish(Err(Error::Cancelled));
        stats.cancelled();
    }
    let (cancelled, kept): (Vec<Running>, Vec<Running>) = running.drain(..).partition(|r| r.link.is_cancelled());
    *running = kept;
    for Running { slots, link, .. } in cancelled {
        drop(slots); // free the cache before the caller hears back
        link.finish(Err(Error::Cancelled));
        stats.cancelled();
    }
}

fn extract<T>(items: &mut VecDeque<T>, mut pick: impl FnMut(&T) -> bool) -> Vec<T> {
    let (picked, kept): (Vec<T>, Vec<T>) = items.drain(..).partition(|x| pick(x));
    *items = kept.into();
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::{self, GenerationParams, NoObserver, Prompt};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A backend whose logits depend only on each sequence's own last token and position, so
    /// any batching must reproduce the solo results; counts live slots.
    #[derive(Default)]
    struct FakeBackend {
        live: AtomicUsize,
        next: AtomicUsize,
    }

    const VOCAB: usize = 50;

    impl Backend for FakeBackend {
        fn vocab_size(&self) -> usize {
            VOCAB
        }
        fn allocate(&self, _capacity: usize) -> Result<SlotId> {
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(self.next.fetch_add(1, Ordering::SeqCst))
        }
        fn release(&self, _slot: SlotId) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
        fn cache_bytes_per_position(&self) -> usize {
            8
        }
        fn cache_bytes_reserved(&self) -> usize {
            0
        }
        fn step(&self, seqs: &[SeqInput], _all: bool) -> Result<Vec<f32>> {
            std::thread::sleep(Duration::from_micros(200));
            let mut out = Vec::with_capacity(seqs.len() * VOCAB);
            for s in seqs {
                let last = *s.tokens.last().unwrap_or(&0) as usize;
                let pos = s.start_pos + s.tokens.len();
                out.extend((0..VOCAB).map(|v| (((v * 7 + last * 13 + pos * 3) % VOCAB) as f32) * 0.1));
            }
            Ok(out)
        }
    }

    fn params(steps: usize, sample: Option<u64>) -> GenerationParams {
        let mut p = GenerationParams { max_new_tokens: steps, ..Default::default() };
        if let Some(seed) = sample {
            p.processors.do_sample = true;
            p.seeds = vec![(seed, 0)];
        }
        p
    }

    fn prompt(i: usize) -> Prompt {
        let tokens: Vec<u32> = (0..(3 + i % 4)).map(|t| ((i * 5 + t) % VOCAB) as u32).collect();
        Prompt { input_ids: tokens.clone(), tokens, ignore_prefix: 0 }
    }

    #[test]
    fn concurrent_requests_match_their_solo_runs_and_share_steps() {
        let backend: Arc<dyn Backend> = Arc::new(FakeBackend::default());
        let solo: Vec<Vec<u32>> = (0..12)
            .map(|i| {
                let p = params(10 + i, (i % 2 == 1).then_some(i as u64));
                generation::generate(backend.as_ref(), vec![prompt(i)], p, None, &mut NoObserver).unwrap().tokens[0]
                    .clone()
            })
            .collect();
        let scheduler = Scheduler::start(Arc::clone(&backend), Limits::default(), false).unwrap();
        scheduler.set_paused(true, None);
        let handles: Vec<RequestHandle> = (0..12)
            .map(|i| {
                let p = params(10 + i, (i % 2 == 1).then_some(i as u64));
                let request = Request::new(vec![prompt(i)], p, None, VOCAB).unwrap();
                scheduler.submit(request, false, false).unwrap()
            })
            .collect();
        scheduler.set_paused(false, None);
        for (i, h) in handles.iter().enumerate() {
            let out = h.wait(Duration::from_millis(5), |_| Ok(())).unwrap();
            assert_eq!(out.tokens[0], solo[i], "request {i}");
        }
        assert_eq!(scheduler.stats().max_step_sequences, 12);
    }

    #[test]
    fn limits_queue_requests_and_cancel_frees_slots() {
        let fake = Arc::new(FakeBackend::default());
        let backend: Arc<dyn Backend> = fake.clone();
        let limits = Limits { max_sequences: 2, ..Limits::default() };
        let scheduler = Scheduler::start(backend, limits, false).unwrap();
        let handles: Vec<RequestHandle> = (0..5)
            .map(|i| scheduler.submit(Request::new(vec![prompt(i)], params(400, None), None, VOCAB).unwrap(), false, false).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        assert!(fake.live.load(Ordering::SeqCst) <= 2);
        assert!(scheduler.stats().max_step_sequences <= 2);
        drop(handles);
        for _ in 0..200 {
            if fake.live.load(Ordering::SeqCst) == 0 && scheduler.stats().running_requests == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(fake.live.load(Ordering::SeqCst), 0);
        assert_eq!(scheduler.stats().cancelled, 5);
    }
}
