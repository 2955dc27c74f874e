//! The dynamic-batching queue as a plain struct (no tokio): requests wait in arrival order;
//! a batch is due when the requests sharing the oldest request's policy fill the maximum
//! batch, or when the oldest request has waited the maximum delay. A batch runs under one
//! policy, so requests with another policy keep their place for a later batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::GatePolicy;

/// A request waiting for a batch.
#[derive(Debug)]
pub struct Pending<T> {
    /// Batch rows it contributes.
    pub items: usize,
    /// Its own policy (per-request gating), or `None` for the live policy, which the batch
    /// snapshots when it starts.
    pub policy: Option<Arc<GatePolicy>>,
    pub enqueued: Instant,
    /// When the request's client stops waiting (queue time included); past it, the request
    /// is dropped before it is computed.
    pub deadline: Option<Instant>,
    pub payload: T,
}

/// The queue's batching rules and state.
#[derive(Debug)]
pub struct BatchQueue<T> {
    waiting: VecDeque<Pending<T>>,
    max_batch: usize,
    max_delay: Duration,
}

impl<T> BatchQueue<T> {
    pub fn new(max_batch: usize, max_delay: Duration) -> Self {
        BatchQueue { waiting: VecDeque::new(), max_batch: max_batch.max(1), max_delay }
    }

    pub fn push(&mut self, pending: Pending<T>) {
        self.waiting.push_back(pending);
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Items (images) waiting, over all requests.
    pub fn items(&self) -> usize {
        self.waiting.iter().map(|p| p.items).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// When the oldest request's wait runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.waiting.front().map(|p| p.enqueued + self.max_delay)
    }

    /// Removes the requests whose deadline has passed at `now` and returns them, oldest first.
    pub fn take_expired(&mut self, now: Instant) -> Vec<T> {
        let expired = |p: &Pending<T>| p.deadline.is_some_and(|d| d <= now);
        if !self.waiting.iter().any(expired) {
            return Vec::new();
        }
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = self.waiting.drain(..).partition(expired);
        self.waiting = kept;
        gone.into_iter().map(|p| p.payload).collect()
    }

    /// Removes every waiting request and returns them, oldest first.
    pub fn drain(&mut self) -> Vec<T> {
        self.waiting.drain(..).map(|p| p.payload).collect()
    }

    /// Removes requests nobody waits for any more; returns how many.
    pub fn drop_abandoned(&mut self, abandoned: impl Fn(&T) -> bool) -> usize {
        let before = self.waiting.len();
        self.waiting.retain(|p| !abandoned(&p.payload));
        before - self.waiting.len()
    }

    /// The next batch if one is due at `now` (or `flush`: take what there is): the oldest
    /// request and, in order, later ones with an equal policy, up to the maximum batch.
    pub fn pop_batch(&mut self, now: Instant, flush: bool) -> Option<Vec<Pending<T>>> {
        let head = self.waiting.front()?;
        let policy = head.policy.clone();
        let same = |p: &Pending<T>| match (&p.policy, &policy) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || **a == **b,
            _ => false,
        };
        let ready: usize = self.waiting.iter().filter(|p| same(p)).map(|p| p.items).sum();
        let due = flush || ready >= self.max_batch || now >= head.enqueued + self.max_delay;
        if !due {
            return None;
        }
        let mut batch = Vec::new();
        let mut items = 0;
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(p) = self.waiting.pop_front() {
            if same(&p) && (batch.is_empty() || items + p.items <= self.max_batch) {
                items += p.items;
                batch.push(p);
            } else {
                kept.push_back(p);
            }
        }
        self.waiting = kept;
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(items: usize, policy: &Arc<GatePolicy>, at: Instant, id: u32) -> Pending<u32> {
        Pending { items, policy: Some(policy.clone()), enqueued: at, deadline: None, payload: id }
    }

    #[test]
    fn waits_for_a_full_batch_or_the_deadline() {
        let t0 = Instant::now();
        let p = Arc::new(GatePolicy::dense());
        let mut q = BatchQueue::new(4, Duration::from_millis(5));
        q.push(pending(1, &p, t0, 1));
        q.push(pending(2, &p, t0, 2));
        assert!(q.pop_batch(t0, false).is_none(), "3 of 4 items, deadline not reached");
        assert_eq!(q.deadline(), Some(t0 + Duration::from_millis(5)));
        let batch = q.pop_batch(t0 + Duration::from_millis(5), false).unwrap();
        assert_eq!(batch.iter().map(|p| p.payload).collect::<Vec<_>>(), vec![1, 2]);
        q.push(pending(3, &p, t0, 3));
        q.push(pending(1, &p, t0, 4));
        q.push(pending(2, &p, t0, 5));
        let batch = q.pop_batch(t0, false).unwrap();
        assert_eq!(batch.iter().map(|p| p.payload).collect::<Vec<_>>(), vec![3, 4], "full at 4 items");
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_batch_runs_under_one_policy_and_others_keep_their_place() {
        let t0 = Instant::now();
        let dense = Arc::new(GatePolicy::dense());
        let other = Arc::new(GatePolicy::with_thresholds(0.5, 0.5, 1.0));
        let same_as_dense = Arc::new(GatePolicy::dense());
        let mut q = BatchQueue::new(8, Duration::ZERO);
        q.push(pending(1, &dense, t0, 1));
        q.push(pending(1, &other, t0, 2));
        q.push(pending(1, &same_as_dense, t0, 3));
        q.push(Pending { items: 1, policy: None, enqueued: t0, deadline: None, payload: 4 });
        q.push(Pending { items: 1, policy: None, enqueued: t0, deadline: None, payload: 5 });
        let first = q.pop_batch(t0, false).unwrap();
        assert_eq!(first.iter().map(|p| p.payload).collect::<Vec<_>>(), vec![1, 3]);
        let second = q.pop_batch(t0, false).unwrap();
        assert_eq!(second.iter().map(|p| p.payload).collect::<Vec<_>>(), vec![2]);
        let live = q.pop_batch(t0, false).unwrap();
        assert_eq!(
            live.iter().map(|p| p.payload).collect::<Vec<_>>(),
            vec![4, 5],
            "live-policy requests batch together"
        );
        assert!(q.is_empty());
    }

    #[test]
    fn abandoned_requests_are_dropped_before_batching() {
        let t0 = Instant::now();
        let p = Arc::new(GatePolicy::dense());
        let mut q = BatchQueue::new(8, Duration::ZERO);
        (1..=4).for_each(|i| q.push(pending(1, &p, t0, i)));
        assert_eq!(q.drop_abandoned(|id| id % 2 == 0), 2);
        let batch = q.pop_batch(t0, true).unwrap();
        assert_eq!(batch.iter().map(|p| p.payload).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn expired_requests_leave_the_queue_before_batching() {
        let t0 = Instant::now();
        let p = Arc::new(GatePolicy::dense());
        let ms = Duration::from_millis;
        let mut q = BatchQueue::new(8, Duration::ZERO);
        for (id, deadline) in [(1, Some(t0 + ms(5))), (2, None), (3, Some(t0 + ms(1))), (4, Some(t0 + ms(9)))]
        {
            q.push(Pending { deadline, ..pending(1, &p, t0, id) });
        }
        assert!(q.take_expired(t0).is_empty());
        assert_eq!(q.take_expired(t0 + ms(5)), vec![1, 3]);
        let batch = q.pop_batch(t0 + ms(5), false).unwrap();
        assert_eq!(batch.iter().map(|p| p.payload).collect::<Vec<_>>(), vec![2, 4]);
    }
}
