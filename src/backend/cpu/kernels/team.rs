//! A fixed team of worker threads for the fork/join of every parallel kernel in a step.
//!
//! Why not rayon alone: a decode step forks ~120 times (4 matmuls per layer), each a few tens of
//! microseconds of work. Between forks rayon's idle workers go to sleep on a futex, and waking a
//! halted vCPU costs about as much as the matvec slice it then runs (~10% of a batch-1 step in
//! `perf`). Team workers instead spin on one atomic for a short while after each fork, so the next
//! fork of the same step finds them awake; only then do they park.
//!
//! The split of work into chunks never depends on which thread runs a chunk, so results are the
//! same bits whatever the team does (kernels stay batch- and thread-invariant).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker keeps spinning before it parks: longer than the gap between two forks
/// of one step (norms, rope, attention; sampling between steps), short enough not to burn a core
/// when the engine is idle.
const SPIN_FOR: Duration = Duration::from_micros(1500);

/// One published fork: `epoch` in the high 32 bits of `claim`, the next unclaimed chunk in the low.
struct Team {
    claim: AtomicU64,
    /// Chunks of the current fork that have finished.
    done: AtomicUsize,
    chunks: AtomicUsize,
    /// The current fork's closure; written only while no chunk of another fork is running.
    job: UnsafeCell<Option<JobRef>>,
    workers: Vec<Worker>,
    /// One fork at a time; a caller that finds it taken (another engine, a nested fork) uses rayon.
    busy: Mutex<()>,
    /// A chunk panicked; the fork holder re-raises it once every chunk has finished.
    panicked: AtomicBool,
}

#[derive(Clone, Copy)]
struct JobRef(*const (dyn Fn(usize) + Sync));

struct Worker {
    thread: Thread,
    parked: AtomicBool,
}

// SAFETY: `job` is written by the single fork holder (under `busy`) before the epoch is published
// and only dereferenced by a thread that claimed a chunk of that epoch, which the holder outlives
// (it waits for every chunk to finish before it returns).
unsafe impl Sync for Team {}
unsafe impl Send for Team {}

static TEAM: OnceLock<Option<Team>> = OnceLock::new();

thread_local! {
    /// Set on the threads of a tensor-parallel rank's own pool: their forks stay in that pool
    /// (rayon), so ranks never compete for the one team.
    static ON_RANK_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as a rank pool's (a pool's `start_handler`).
pub(crate) fn mark_rank_pool_thread() {
    ON_RANK_POOL.with(|c| c.set(true));
}

fn team() -> Option<&'static Team> {
    TEAM.get_or_init(|| {
        let helpers = rayon::current_num_threads().saturating_sub(1);
        // Workers wait for TEAM to be published before touching it.
        let workers: Vec<Worker> = (0..helpers)
            .map_while(|i| thread::Builder::new().name(format!("kvgen-team-{i}")).spawn(move || worker_loop(i)).ok())
            .map(|handle| Worker { thread: handle.thread().clone(), parked: AtomicBool::new(false) })
            .collect();
        if workers.is_empty() {
            return None;
        }
        Some(Team {
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            chunks: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            workers,
            busy: Mutex::new(()),
            panicked: AtomicBool::new(false),
        })
    })
    .as_ref()
}

/// Runs `f(0..chunks)`, spread over the calling thread and the team; returns when all are done.
pub(crate) fn run(chunks: usize, f: &(dyn Fn(usize) + Sync)) {
    if chunks <= 1 {
        (0..chunks).for_each(f);
        return;
    }
    if ON_RANK_POOL.with(|c| c.get()) {
        return rayon_run(chunks, f);
    }
    let team = match team() {
        Some(t) => t,
        None => return rayon_run(chunks, f),
    };
    // `busy` guards no data: a fork that panicked (and so poisoned it) leaves the team usable.
    let _guard = match team.busy.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return rayon_run(chunks, f),
    };
    // SAFETY: we hold `busy`, and the previous fork finished (every chunk done) before its holder
    // released it, so no worker is inside a job; the lifetime is erased only for the duration of
    // this call, which waits for every chunk below.
    unsafe {
        let erased: *const (dyn Fn(usize) + Sync + 'static) = std::mem::transmute(f as *const (dyn Fn(usize) + Sync));
        *team.job.get() = Some(JobRef(erased));
    }
    team.chunks.store(chunks, Ordering::Relaxed);
    team.done.store(0, Ordering::Relaxed);
    let epoch = (team.claim.load(Ordering::Relaxed) >> 32).wrapping_add(1) & 0xffff_ffff;
    team.claim.store(epoch << 32, Ordering::SeqCst);
    for w in &team.workers {
        if w.parked.load(Ordering::SeqCst) {
            w.thread.unpark();
        }
    }
    work_on(team, epoch, f);
    while team.done.load(Ordering::Acquire) < chunks {
        std::hint::spin_loop();
    }
    if team.panicked.swap(false, Ordering::Relaxed) {
        panic!("a parallel kernel chunk panicked");
    }
}

fn rayon_run(chunks: usize, f: &(dyn Fn(usize) + Sync)) {
    use rayon::prelude::*;
    (0..chunks).into_par_iter().with_max_len(1).for_each(f);
}

/// Claims and runs chunks of fork `epoch` until none are left.
fn work_on(team: &Team, epoch: u64, f: &(dyn Fn(usize) + Sync)) {
    let chunks = team.chunks.load(Ordering::Relaxed) as u64;
    let mut cur = team.claim.load(Ordering::Acquire);
    loop {
        if cur >> 32 != epoch || (cur & 0xffff_ffff) >= chunks {
            return;
        }
        match team.claim.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // A panicking chunk must still count as done, or the holder would wait forever
                // (and must not return while other chunks still use `f`).
                let chunk = (cur & 0xffff_ffff) as usize;
                if catch_unwind(AssertUnwindSafe(|| f(chunk))).is_err() {
                    team.panicked.store(true, Ordering::Relaxed);
                }
                team.done.fetch_add(1, Ordering::Release);
                cur = team.claim.load(Ordering::Acquire);
            }
            Err(now) => cur = now,
        }
    }
}

fn worker_loop(index: usize) {
    let team = loop {
        // The team is published right after the workers start.
        if let Some(Some(t)) = TEAM.get() {
            break t;
        }
        thread::park_timeout(Duration::from_millis(1));
    };
    let Some(me) = team.workers.get(index) else { return };
    let mut seen = team.claim.load(Ordering::Acquire) >> 32;
    loop {
        let spin_start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = team.claim.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if spins % 256 == 0 && spin_start.elapsed() > SPIN_FOR {
                me.parked.store(true, Ordering::SeqCst);
                if team.claim.load(Ordering::SeqCst) >> 32 == seen {
                    thread::park();
                }
                me.parked.store(false, Ordering::SeqCst);
                continue;
            }
            std::hint::spin_loop();
        };
        seen = epoch;
        // SAFETY: read after observing the epoch (Acquire); only called through a chunk claimed
        // for that same epoch, see `Team`.
        if let Some(JobRef(job)) = unsafe { *team.job.get() } {
            work_on(team, epoch, unsafe { &*job });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_chunk_runs_exactly_once() {
        for chunks in [0usize, 1, 2, 3, 8, 64] {
            for _ in 0..200 {
                let hits: Vec<AtomicU32> = (0..chunks).map(|_| AtomicU32::new(0)).collect();
                run(chunks, &|c| {
                    hits[c].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "chunks={chunks}");
            }
        }
    }

    #[test]
    fn a_panicking_chunk_is_raised_and_the_team_still_runs() {
        let caught = std::panic::catch_unwind(|| {
            run(4, &|c| {
                if c == 2 {
                    panic!("chunk 2");
                }
            })
        });
        assert!(caught.is_err());
        every_chunk_runs_exactly_once();
    }

    #[test]
    fn concurrent_and_nested_forks_fall_back_safely() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        run(4, &|_| {
                            run(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 4 * 3);
    }
}
