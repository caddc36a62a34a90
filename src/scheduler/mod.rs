//! Continuous batching: one worker thread owns the model step loop. Requests submitted from any
//! thread wait in a FIFO queue, join the running batch at the next step (their prefill in the
//! same backend step as the others' decode) while the limits on concurrent sequences and cache
//! positions allow, and free their cache slots as soon as they finish or are cancelled.
//!
//! Results do not depend on who else is in the batch: the CPU kernels are batch-invariant and
//! every row keeps its own processors and random stream. The one exception, dynamic NTK RoPE
//! (whose frequencies follow the longest sequence in a step), is run one request per step.

pub mod doorbell;
pub mod link;
mod stats;
pub mod trim;

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rayon::prelude::*;

use crate::backend::{Backend, SeqInput, SlotId};
use crate::error::{catch_panic, panic_message, Error, Result};
use crate::faults::{self, FaultPoint};
use crate::generation::{GenerationOutput, Request};
pub use doorbell::Doorbell;
pub use link::{Events, Link};
pub use stats::StatsSnapshot;
use stats::Stats;

/// Bounds on what runs and waits at once. A request that could never run within them is refused
/// at submit; one that fits waits until the running ones leave room.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences (rows) decoding together.
    pub max_sequences: usize,
    /// KV-cache positions reserved together (each row reserves prompt + max_new_tokens).
    pub max_cache_positions: usize,
    /// Requests waiting for admission; a submit beyond it is refused with `Error::Overloaded`.
    pub max_queued_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_sequences: 256, max_cache_positions: 1 << 20, max_queued_requests: 1024 }
    }
}

/// Whether `request` can ever run within `limits` (alone); the error names the bound and the fix.
fn check_fits(request: &Request, limits: &Limits, bytes_per_position: usize, backend_rows: Option<usize>) -> Result<()> {
    let rows = request.rows();
    if let Some(max) = backend_rows.filter(|&m| rows > m) {
        return Err(Error::invalid(format!(
            "this request has {rows} rows (prompts x num_return_sequences) but the backend holds at most {max} \
             sequences at once (device=\"neuron\": the largest exported batch size); send fewer rows per call or \
             export with larger batch_sizes"
        )));
    }
    if rows > limits.max_sequences {
        return Err(Error::invalid(format!(
            "this request has {rows} rows (prompts x num_return_sequences) but the scheduler runs at most \
             max_sequences={} at once; send fewer rows per call or raise the bound with \
             gen.set_scheduler_limits(max_sequences=...)",
            limits.max_sequences
        )));
    }
    let positions = request.cache_positions();
    if positions > limits.max_cache_positions {
        let bytes = |n: usize| crate::mem::format_bytes(n.saturating_mul(bytes_per_position));
        return Err(Error::invalid(format!(
            "this request needs {positions} KV-cache positions ({rows} rows x prompt + max_new_tokens; {}) but the \
             scheduler's cache budget is max_cache_tokens={} ({}); lower max_new_tokens, the prompt length or the \
             number of rows, or raise the budget with gen.set_scheduler_limits(max_cache_tokens=...)",
            bytes(positions),
            limits.max_cache_positions,
            bytes(limits.max_cache_positions)
        )));
    }
    Ok(())
}

/// A cache slot that goes back to the backend when dropped (finish, error, cancel). A panic in
/// the backend's release is contained here: a drop that panics while another panic unwinds
/// would abort the process.
struct OwnedSlot {
    backend: Arc<dyn Backend>,
    slot: SlotId,
}

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        let (backend, slot) = (&self.backend, self.slot);
        let _ = catch_unwind(AssertUnwindSafe(|| backend.release(slot)));
    }
}

/// The scheduler's hold on a request's link: finishes it with an internal error if the request
/// is dropped without an answer (a fault unwound past it), so no caller waits forever.
struct Answer(Arc<Link>);

impl Answer {
    fn send(&self, result: Result<GenerationOutput>) {
        self.0.finish(result);
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        // Ignored when the request was already answered.
        self.0.finish(Err(Error::Internal("the scheduler dropped this request after an internal fault".into())));
    }
}

/// Counts a request as queued from submit until it is admitted or dropped.
struct QueuedTicket(Arc<Shared>);

impl Drop for QueuedTicket {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Waiting {
    request: Request,
    answer: Answer,
    _queued: QueuedTicket,
}

struct Running {
    request: Request,
    slots: Vec<OwnedSlot>,
    answer: Answer,
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
    /// Requests submitted and not yet admitted or dropped (incoming and waiting together).
    queued: AtomicUsize,
    /// False once the worker thread has stopped: waits and submits then fail instead of hanging.
    alive: AtomicBool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Scheduler {
    shared: Arc<Shared>,
    bytes_per_position: usize,
    /// The backend's fixed number of cache rows, if it has one.
    backend_rows: Option<usize>,
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
            if !self.shared.alive.load(Ordering::Acquire) && !self.link.is_finished() {
                return Err(Error::Internal("the scheduler thread stopped; reload the model".into()));
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
            queued: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
        });
        let bytes_per_position = backend.cache_bytes_per_position();
        let backend_rows = backend.max_sequences();
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("kvgen-scheduler".into())
            .spawn(move || {
                Worker { shared: worker_shared, backend, isolate_requests, waiting: VecDeque::new(), running: Vec::new() }
                    .run()
            })
            .map_err(|e| Error::Internal(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Scheduler { shared, bytes_per_position, backend_rows, worker: Some(worker) })
    }

    /// Queues a request; it joins the batch at the next step the limits allow. Refused at once
    /// when it could never fit the limits, or when the admission queue is full.
    pub fn submit(&self, request: Request, stream_steps: bool, doorbell: Option<Arc<Doorbell>>) -> Result<RequestHandle> {
        let link = Arc::new(Link::new(stream_steps, doorbell));
        let handle = RequestHandle { link: Arc::clone(&link), shared: Arc::clone(&self.shared) };
        if request.is_done() {
            link.finish(Ok(request.into_output()));
            return Ok(handle);
        }
        {
            let mut queue = self.shared.queue();
            if queue.shutdown || !self.shared.alive.load(Ordering::Acquire) {
                return Err(Error::Internal("the scheduler has shut down".into()));
            }
            check_fits(&request, &queue.limits, self.bytes_per_position, self.backend_rows)?;
            let queued = self.shared.queued.load(Ordering::Acquire);
            if queued >= queue.limits.max_queued_requests {
                self.shared.stats.rejected();
                return Err(Error::Overloaded(format!(
                    "the scheduler's admission queue is full ({queued} requests wait, max_queued_requests={}); retry \
                     later or raise the bound with gen.set_scheduler_limits(max_queued_requests=...)",
                    queue.limits.max_queued_requests
                )));
            }
            self.shared.queued.fetch_add(1, Ordering::AcqRel);
            let ticket = QueuedTicket(Arc::clone(&self.shared));
            queue.incoming.push_back(Waiting { request, answer: Answer(link), _queued: ticket });
        }
        self.shared.wake.notify_all();
        Ok(handle)
    }

    pub fn limits(&self) -> Limits {
        self.shared.queue().limits
    }

    pub fn set_limits(&self, limits: Limits) -> Result<()> {
        if limits.max_sequences == 0 || limits.max_cache_positions == 0 || limits.max_queued_requests == 0 {
            return Err(Error::invalid(format!(
                "max_sequences={}, max_cache_tokens={} and max_queued_requests={} must all be at least 1",
                limits.max_sequences, limits.max_cache_positions, limits.max_queued_requests
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
        let mut s = self.shared.stats.snapshot();
        s.queued_requests = self.shared.queued.load(Ordering::Acquire);
        s
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
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
}

/// Whatever ends the worker thread, nothing it holds or that is queued is left unanswered.
impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.alive.store(false, Ordering::Release);
        let incoming: Vec<Waiting> = self.shared.queue().incoming.drain(..).collect();
        self.waiting.extend(incoming);
        self.fail_all("the scheduler stopped before this request could finish");
    }
}

impl Worker {
    /// The step loop. A panic that escapes a turn (a kvgen bug) fails the requests in flight
    /// with an internal error; the loop then carries on with new requests.
    fn run(mut self) {
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.turn())) {
                Ok(true) => {}
                Ok(false) => return,
                Err(payload) => {
                    self.shared.stats.internal_fault();
                    self.fail_all(&format!(
                        "the scheduler caught an internal fault ({}) and stopped the requests in flight; the \
                         generator keeps serving (please report this)",
                        panic_message(payload.as_ref())
                    ));
                    self.publish();
                }
            }
        }
    }

    /// Answers every waiting and running request with `Error::Internal(message)`, running ones
    /// after their slots are free.
    fn fail_all(&mut self, message: &str) {
        for w in self.waiting.drain(..) {
            w.answer.send(Err(Error::Internal(message.into())));
        }
        for r in std::mem::take(&mut self.running) {
            self.finish(r, Err(Error::Internal(message.into())));
        }
    }

    /// Waits for work, admits what fits and runs one step. False once the engine shuts down.
    fn turn(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let limits = {
            let mut queue = shared.queue();
            loop {
                self.waiting.extend(queue.incoming.drain(..));
                self.drop_cancelled();
                if queue.shutdown {
                    self.fail_all("the engine shut down");
                    return false;
                }
                if queue.pause_at_step.is_some_and(|at| self.shared.stats.steps() >= at) {
                    queue.paused = true;
                    queue.pause_at_step = None;
                }
                let has_work = !self.running.is_empty() || !self.waiting.is_empty();
                if has_work && !queue.paused {
                    break queue.limits;
                }
                self.publish();
                queue = match shared.wake.wait(queue) {
                    Ok(q) => q,
                    Err(p) => p.into_inner(),
                };
            }
        };
        self.admit(limits);
        self.publish();
        faults::check(FaultPoint::Loop, self.running.iter().flat_map(|r| r.request.prompt_tokens()));
        if !self.running.is_empty() {
            self.step();
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                trim::return_freed_memory();
            }
        }
        true
    }

    fn publish(&self) {
        let rows: usize = self.running.iter().map(|r| r.request.rows()).sum();
        self.shared.stats.set_load(self.running.len(), rows);
    }

    /// Moves queued requests into the batch in arrival order while they fit. Their memory (KV
    /// slots, score buffers) is reserved here, against the budget, not at submit.
    fn admit(&mut self, limits: Limits) {
        let bytes_per_position = self.backend.cache_bytes_per_position();
        let backend_rows = self.backend.max_sequences();
        let max_sequences = limits.max_sequences.min(backend_rows.unwrap_or(usize::MAX));
        let mut rows: usize = self.running.iter().map(|r| r.request.rows()).sum();
        let mut positions: usize = self.running.iter().map(|r| r.request.cache_positions()).sum();
        while let Some(next) = self.waiting.front() {
            let (need_rows, need_positions) = (next.request.rows(), next.request.cache_positions());
            // The limits may have been lowered since the request was submitted.
            if let Err(e) = check_fits(&next.request, &limits, bytes_per_position, backend_rows) {
                if let Some(w) = self.waiting.pop_front() {
                    w.answer.send(Err(e));
                }
                continue;
            }
            let fits = rows + need_rows <= max_sequences && positions + need_positions <= limits.max_cache_positions;
            if !fits {
                break;
            }
            let Some(Waiting { mut request, answer, _queued }) = self.waiting.pop_front() else { break };
            drop(_queued);
            match catch_panic("a panic while admitting the request", || self.reserve(&mut request)) {
                Ok(slots) => {
                    rows += need_rows;
                    positions += need_positions;
                    self.running.push(Running { request, slots, answer });
                }
                Err(e) => answer.send(Err(e)),
            }
        }
    }

    /// A request's cache slots and working buffers.
    fn reserve(&self, request: &mut Request) -> Result<Vec<OwnedSlot>> {
        faults::check(FaultPoint::Admit, request.prompt_tokens());
        let slots = (0..request.rows())
            .map(|r| {
                let slot = self.backend.allocate(request.slot_capacity(r))?;
                Ok(OwnedSlot { backend: Arc::clone(&self.backend), slot })
            })
            .collect::<Result<Vec<_>>>()?;
        request.reserve_buffers()?;
        Ok(slots)
    }

    /// Frees a request's slots, then answers its caller (so the memory is free when it hears
    /// back). A panic while releasing is contained: the request still gets its answer.
    fn finish(&self, running: Running, result: Result<()>) {
        let Running { request, slots, answer } = running;
        let released = catch_unwind(AssertUnwindSafe(|| {
            faults::check(FaultPoint::Release, request.prompt_tokens());
            drop(slots);
        }));
        if released.is_err() {
            self.shared.stats.internal_fault();
        }
        answer.send(result.map(|()| request.into_output()));
    }

    /// One step of every running request; those that end leave `running`.
    fn step(&mut self) {
        let outcomes = if self.isolate_requests {
            self.running.iter().map(|r| self.forward(std::slice::from_ref(r))).collect()
        } else {
            match self.forward(&self.running) {
                Ok(logits) => split_logits(logits, &self.running),
                // Rerun each alone, so a failure lands on the request that caused it.
                Err(_) => self.running.iter().map(|r| self.forward(std::slice::from_ref(r))).collect(),
            }
        };
        let sequences: usize = self.running.iter().map(|r| r.request.step_inputs().len()).sum();
        let prefills = self.running.iter().filter(|r| r.request.is_prefill()).count();
        self.shared.stats.stepped(sequences, prefills > 0 && prefills < self.running.len());

        let advanced: Vec<Result<Vec<u32>>> = self
            .running
            .par_iter_mut()
            .zip(outcomes)
            .map(|(r, logits)| {
                let logits = logits?;
                catch_panic("a panic while processing a step", || r.request.advance(&logits))
            })
            .collect();
        for (mut r, outcome) in std::mem::take(&mut self.running).into_iter().zip(advanced) {
            // Beam search moves or copies its rows' caches between steps.
            let outcome = outcome.and_then(|tokens| match r.request.take_reorder() {
                Some((sources, positions)) => {
                    crate::generation::reorder_slots(&*self.backend, &mut r.slots, |s| s.slot, &sources, &positions)
                        .map(|()| tokens)
                }
                None => Ok(tokens),
            });
            match outcome {
                Ok(tokens) => {
                    r.answer.0.push_step(tokens);
                    if r.request.is_done() {
                        self.finish(r, Ok(()));
                        self.shared.stats.completed();
                    } else {
                        self.running.push(r);
                    }
                }
                Err(e) => {
                    self.finish(r, Err(e));
                    self.shared.stats.completed();
                }
            }
        }
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
        catch_panic("a panic in the backend step", || self.backend.step(&seqs, false))
    }

    fn drop_cancelled(&mut self) {
        let (cancelled, kept): (Vec<Waiting>, Vec<Waiting>) = self.waiting.drain(..).partition(|w| w.answer.0.is_cancelled());
        self.waiting = kept.into();
        for w in cancelled {
            w.answer.send(Err(Error::Cancelled));
            self.shared.stats.cancelled();
        }
        let (cancelled, kept): (Vec<Running>, Vec<Running>) =
            std::mem::take(&mut self.running).into_iter().partition(|r| r.answer.0.is_cancelled());
        self.running = kept;
        for r in cancelled {
            self.finish(r, Err(Error::Cancelled));
            self.shared.stats.cancelled();
        }
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
        /// A step that feeds this token panics (a fault in one request's part of a mixed step).
        poison: Option<u32>,
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
            if seqs.iter().any(|s| self.poison.is_some_and(|p| s.tokens.contains(&p))) {
                panic!("poisoned step");
            }
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
                scheduler.submit(request, false, None).unwrap()
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
            .map(|i| scheduler.submit(Request::new(vec![prompt(i)], params(400, None), None, VOCAB).unwrap(), false, None).unwrap())
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

    #[test]
    fn a_request_that_can_never_fit_is_refused_at_submit() {
        let backend: Arc<dyn Backend> = Arc::new(FakeBackend::default());
        let limits = Limits { max_sequences: 2, max_cache_positions: 100, max_queued_requests: 8 };
        let scheduler = Scheduler::start(backend, limits, false).unwrap();
        let too_wide = Request::new(vec![prompt(0), prompt(1), prompt(2)], params(5, None), None, VOCAB).unwrap();
        let err = scheduler.submit(too_wide, false, None).err().expect("three rows exceed max_sequences=2");
        assert!(matches!(&err, Error::InvalidInput(m) if m.contains("max_sequences=2")), "{err}");
        let too_long = Request::new(vec![prompt(0)], params(1000, None), None, VOCAB).unwrap();
        let err = scheduler.submit(too_long, false, None).err().expect("1000 positions exceed the budget of 100");
        assert!(matches!(&err, Error::InvalidInput(m) if m.contains("max_cache_tokens=100")), "{err}");
        let fits = Request::new(vec![prompt(0)], params(5, None), None, VOCAB).unwrap();
        assert_eq!(scheduler.submit(fits, false, None).unwrap().wait(Duration::from_millis(5), |_| Ok(())).unwrap().tokens[0].len(), 5);
    }

    #[test]
    fn a_full_queue_refuses_with_overloaded() {
        let backend: Arc<dyn Backend> = Arc::new(FakeBackend::default());
        let limits = Limits { max_queued_requests: 3, ..Limits::default() };
        let scheduler = Scheduler::start(backend, limits, false).unwrap();
        scheduler.set_paused(true, None);
        let submit = || scheduler.submit(Request::new(vec![prompt(0)], params(3, None), None, VOCAB).unwrap(), false, None);
        let held: Vec<RequestHandle> = (0..3).map(|_| submit().unwrap()).collect();
        assert!(matches!(submit().err(), Some(Error::Overloaded(m)) if m.contains("max_queued_requests=3")));
        assert_eq!(scheduler.stats().queued_requests, 3);
        assert_eq!(scheduler.stats().rejected, 1);
        scheduler.set_paused(false, None);
        for h in &held {
            h.wait(Duration::from_millis(5), |_| Ok(())).unwrap();
        }
        assert_eq!(scheduler.stats().queued_requests, 0);
        submit().unwrap().wait(Duration::from_millis(5), |_| Ok(())).unwrap();
    }

    #[test]
    fn a_panic_in_one_requests_part_of_a_step_fails_only_that_request() {
        let backend: Arc<dyn Backend> = Arc::new(FakeBackend { poison: Some(49), ..Default::default() });
        let scheduler = Scheduler::start(Arc::clone(&backend), Limits::default(), false).unwrap();
        let solo: Vec<Vec<u32>> = (0..3)
            .map(|i| generation::generate(backend.as_ref(), vec![prompt(i)], params(12, None), None, &mut NoObserver).unwrap().tokens[0].clone())
            .collect();
        scheduler.set_paused(true, None);
        let good: Vec<RequestHandle> = (0..3)
            .map(|i| scheduler.submit(Request::new(vec![prompt(i)], params(12, None), None, VOCAB).unwrap(), false, None).unwrap())
            .collect();
        let poisoned = Prompt { input_ids: vec![1, 49, 2], tokens: vec![1, 49, 2], ignore_prefix: 0 };
        let bad = scheduler.submit(Request::new(vec![poisoned], params(12, None), None, VOCAB).unwrap(), false, None).unwrap();
        scheduler.set_paused(false, None);
        let err = bad.wait(Duration::from_millis(5), |_| Ok(())).err().expect("the poisoned request fails");
        assert!(matches!(&err, Error::Internal(m) if m.contains("poisoned step")), "{err}");
        for (i, h) in good.iter().enumerate() {
            assert_eq!(h.wait(Duration::from_millis(5), |_| Ok(())).unwrap().tokens[0], solo[i], "request {i}");
        }
    }

    #[test]
    fn a_worker_that_stops_answers_every_request_it_held() {
        let backend: Arc<dyn Backend> = Arc::new(FakeBackend::default());
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            stats: Stats::default(),
            queued: AtomicUsize::new(0),
            alive: AtomicBool::new(true),
        });
        let mut worker = Worker { shared: Arc::clone(&shared), backend, isolate_requests: false, waiting: VecDeque::new(), running: Vec::new() };
        let mut handles = Vec::new();
        for i in 0..2 {
            let link = Arc::new(Link::new(false, None));
            handles.push(RequestHandle { link: Arc::clone(&link), shared: Arc::clone(&shared) });
            shared.queued.fetch_add(1, Ordering::AcqRel);
            let waiting = Waiting {
                request: Request::new(vec![prompt(i)], params(3, None), None, VOCAB).unwrap(),
                answer: Answer(link),
                _queued: QueuedTicket(Arc::clone(&shared)),
            };
            if i == 0 {
                worker.waiting.push_back(waiting);
            } else {
                shared.queue().incoming.push_back(waiting);
            }
        }
        drop(worker);
        assert!(!shared.alive.load(Ordering::Acquire));
        assert_eq!(shared.queued.load(Ordering::Acquire), 0);
        for h in &handles {
            let err = h.wait(Duration::from_millis(5), |_| Ok(())).err().expect("answered with an error");
            assert!(matches!(err, Error::Internal(_)), "{err}");
        }
    }
}
