//! One thread per rank that runs that rank's part of a step (write step inputs, execute, read
//! outputs), so all ranks are inside `nrt_execute` together (a collective waits for every rank),
//! with a deadline the caller waits at most: a rank that does not return is left running and
//! marked busy, and the next step first waits for it to come back.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A rank's failure: the error, and whether it was the runtime's own timeout (a consequence of a
/// stuck peer, so the peer's error is the one worth reporting).
pub struct RankFailure {
    pub error: Error,
    pub timeout: bool,
}

pub type RankResult = std::result::Result<Vec<Vec<u8>>, RankFailure>;
pub type Job = Box<dyn FnOnce() -> RankResult + Send>;

struct Worker {
    jobs: Option<Sender<(u64, Job)>>,
    results: Receiver<(u64, RankResult)>,
    thread: Option<JoinHandle<()>>,
    /// The sequence number of a job sent and not yet answered.
    pending: Option<u64>,
}

pub struct Workers {
    workers: Vec<Worker>,
    next: u64,
}

/// What `run` got: every rank's result, or the ranks that missed the deadline.
pub enum Outcome {
    Done(Vec<RankResult>),
    Late(Vec<usize>),
}

impl Workers {
    pub fn spawn(ranks: usize) -> Result<Workers> {
        let mut workers = Vec::with_capacity(ranks);
        for rank in 0..ranks {
            let (job_tx, job_rx) = mpsc::channel::<(u64, Job)>();
            let (res_tx, res_rx) = mpsc::channel::<(u64, RankResult)>();
            let thread = std::thread::Builder::new()
                .name(format!("kvgen-nrt-rank{rank}"))
                .spawn(move || {
                    for (seq, job) in job_rx {
                        // A panic inside a job must not kill the rank (the executor stays usable).
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).unwrap_or_else(|p| {
                            Err(RankFailure {
                                error: Error::Internal(format!(
                                    "rank {rank} worker: {}",
                                    crate::error::panic_message(p.as_ref())
                                )),
                                timeout: false,
                            })
                        });
                        if res_tx.send((seq, result)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::Internal(format!("could not start the rank {rank} thread: {e}")))?;
            workers.push(Worker { jobs: Some(job_tx), results: res_rx, thread: Some(thread), pending: None });
        }
        Ok(Workers { workers, next: 0 })
    }

    /// Waits until `deadline` for ranks still busy with an earlier step; the ranks still busy.
    pub fn settle(&mut self, deadline: Instant) -> Vec<usize> {
        let mut busy = Vec::new();
        for (rank, w) in self.workers.iter_mut().enumerate() {
            while let Some(seq) = w.pending {
                match w.results.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    // Stale results (a step already reported as failed) are dropped.
                    Ok((s, _)) if s == seq => w.pending = None,
                    Ok(_) => {}
                    Err(RecvTimeoutError::Timeout) => {
                        busy.push(rank);
                        break;
                    }
                    Err(RecvTimeoutError::Disconnected) => w.pending = None,
                }
            }
        }
        busy
    }

    /// Runs `jobs[rank]` on every rank at once; waits for them until `deadline`.
    /// Every rank must be idle (`settle` returned no rank).
    pub fn run(&mut self, jobs: Vec<Job>, deadline: Instant) -> Result<Outcome> {
        if jobs.len() != self.workers.len() {
            return Err(Error::Internal(format!("{} rank jobs for {} ranks", jobs.len(), self.workers.len())));
        }
        self.next += 1;
        let seq = self.next;
        for (rank, (w, job)) in self.workers.iter_mut().zip(jobs).enumerate() {
            let sent = w.jobs.as_ref().map(|tx| tx.send((seq, job)).is_ok()).unwrap_or(false);
            if !sent {
                return Err(Error::Internal(format!("the rank {rank} worker thread is gone")));
            }
            w.pending = Some(seq);
        }
        let mut done = Vec::new();
        let mut late = Vec::new();
        for (rank, w) in self.workers.iter_mut().enumerate() {
            loop {
                match w.results.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok((s, r)) if s == seq => {
                        w.pending = None;
                        done.push((rank, r));
                        break;
                    }
                    Ok(_) => {}
                    Err(RecvTimeoutError::Timeout) => {
                        late.push(rank);
                        break;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        w.pending = None;
                        done.push((
                            rank,
                            Err(RankFailure {
                                error: Error::Internal(format!("the rank {rank} worker thread is gone")),
                                timeout: false,
                            }),
                        ));
                        break;
                    }
                }
            }
        }
        if late.is_empty() {
            Ok(Outcome::Done(done.into_iter().map(|(_, r)| r).collect()))
        } else {
            Ok(Outcome::Late(late))
        }
    }

    /// Stops the threads; true when every rank was idle (or came back within `grace`), so the
    /// handles their jobs used may be freed.
    pub fn shutdown(&mut self, grace: Duration) -> bool {
        let idle = self.settle(Instant::now() + grace).is_empty();
        for w in &mut self.workers {
            w.jobs = None;
        }
        if idle {
            for w in &mut self.workers {
                if let Some(t) = w.thread.take() {
                    let _ = t.join();
                }
            }
        }
        idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(ms: u64, out: u8) -> Job {
        Box::new(move || {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(vec![vec![out]])
        })
    }

    #[test]
    fn all_ranks_answer_in_rank_order() {
        let mut w = Workers::spawn(2).unwrap();
        match w.run(vec![job(20, 0), job(0, 1)], Instant::now() + Duration::from_secs(5)).unwrap() {
            Outcome::Done(r) => {
                let r: Vec<_> = r.into_iter().map(|x| x.ok().unwrap()).collect();
                assert_eq!(r, vec![vec![vec![0]], vec![vec![1]]]);
            }
            Outcome::Late(l) => panic!("late {l:?}"),
        }
        assert!(w.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_late_rank_is_reported_then_waited_for_and_its_stale_result_dropped() {
        let mut w = Workers::spawn(2).unwrap();
        let out = w.run(vec![job(0, 0), job(300, 1)], Instant::now() + Duration::from_millis(50)).unwrap();
        assert!(matches!(out, Outcome::Late(ref l) if l == &[1]));
        // Still busy a moment later, back within a longer wait.
        assert_eq!(w.settle(Instant::now() + Duration::from_millis(10)), vec![1]);
        assert!(w.settle(Instant::now() + Duration::from_secs(5)).is_empty());
        match w.run(vec![job(0, 2), job(0, 3)], Instant::now() + Duration::from_secs(5)).unwrap() {
            Outcome::Done(r) => assert_eq!(r[1].as_ref().ok().unwrap(), &vec![vec![3]]),
            Outcome::Late(l) => panic!("late {l:?}"),
        }
        assert!(w.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_panicking_job_is_an_internal_error_and_the_rank_survives() {
        let mut w = Workers::spawn(1).unwrap();
        let boom: Job = Box::new(|| panic!("boom"));
        match w.run(vec![boom], Instant::now() + Duration::from_secs(5)).unwrap() {
            Outcome::Done(mut r) => match r.remove(0) {
                Err(f) => assert!(f.error.to_string().contains("boom")),
                Ok(_) => panic!("no error"),
            },
            Outcome::Late(_) => panic!("late"),
        }
        assert!(matches!(w.run(vec![job(0, 9)], Instant::now() + Duration::from_secs(5)).unwrap(), Outcome::Done(_)));
    }
}
