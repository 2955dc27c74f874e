//! The decode pool: a fixed set of threads for CPU-heavy request work (large JSON bodies,
//! images, large responses), off the async runtime. Its threads run at a lower scheduling
//! priority (nice +5) than the async workers, the engines and the metrics thread, so bulk
//! decoding yields the CPU to health checks, scrapes and inference when cores are scarce.
//! Jobs wait in a bounded queue; every waiter holds a request slot of the server's budget,
//! so the wait is bounded too.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::error::ApiError;

type Job = Box<dyn FnOnce() + Send>;

/// How much lower the pool's threads run than the rest (Linux `nice` steps).
const NICE: i32 = 5;

/// A fixed pool of decode threads.
pub struct DecodePool {
    jobs: SyncSender<Job>,
}

impl DecodePool {
    /// Starts `threads` threads taking jobs from a queue of `queue` places.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let (jobs, inbox) = sync_channel::<Job>(queue.max(1));
        let inbox = Arc::new(Mutex::new(inbox));
        for i in 0..threads.max(1) {
            let inbox = inbox.clone();
            std::thread::Builder::new().name(format!("decode-{i}")).spawn(move || work(&inbox))?;
        }
        Ok(DecodePool { jobs })
    }

    /// Runs `work` on the pool and waits for its result; refuses at once (429) when the
    /// pool's queue is full.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::Busy(
                    "every decode thread is busy and its queue is full; retry later".into(),
                ));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::Unavailable("the decode pool has stopped".into()));
            }
        }
        result.await.map_err(|_| ApiError::Internal("a decoding task panicked".into()))
    }
}

/// A pool thread: lower its priority, then run jobs until the pool is dropped. A job that
/// panics fails its own request (its result is never sent) and the thread goes on.
fn work(inbox: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        let job = match inbox.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: gettid and setpriority take no pointers; a failure only leaves the priority as it was.
    let failed = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE) != 0
    };
    if failed {
        tracing::debug!("cannot lower the decode thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// Raises the calling thread's priority by `steps` nice levels where the process may (root
/// or CAP_SYS_NICE); elsewhere leaves it as it is.
#[cfg(target_os = "linux")]
pub fn raise_priority(steps: i32) {
    // SAFETY: as above.
    let failed = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -steps) != 0
    };
    if failed {
        tracing::debug!("cannot raise the thread's priority (no CAP_SYS_NICE)");
    }
}

#[cfg(not(target_os = "linux"))]
pub fn raise_priority(_steps: i32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_off_the_caller_and_a_panic_fails_only_its_own() {
        let pool = DecodePool::new(1, 4).unwrap();
        let caller = std::thread::current().id();
        let ran_on = pool.run(move || std::thread::current().id()).await.unwrap();
        assert_ne!(ran_on, caller);
        let failed = pool.run(|| -> u8 { panic!("a bad image") }).await;
        assert!(matches!(failed, Err(ApiError::Internal(_))));
        assert_eq!(pool.run(|| 7).await.unwrap(), 7, "the thread goes on after a panic");
    }
}
