//! A bounded memory of recent values by job id, forgetting the oldest first.
//!
//! The consumer keeps the results it published recently: at-least-once delivery means a job
//! can arrive again after it was completed (a redelivery after a lost ack, or a producer
//! re-publishing after a lost confirm), and it answers such a repeat with the stored result.
//! `producer serve` keeps results and accepted ids for `GET /jobs/{id}`.

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use uuid::Uuid;

/// A stored result body, shared without copying.
pub type Body = Arc<[u8]>;

/// Values by job id, at most `capacity` of them (and, when weighed, at most `max_bytes`).
#[derive(Debug)]
pub struct Recent<V> {
    capacity: usize,
    max_bytes: usize,
    weigh: fn(&V) -> usize,
    inner: Mutex<Window<V>>,
    /// How many values are stored, read without the lock: an empty window (the usual state of
    /// some, like the consumer's refused results) costs a lookup nothing.
    stored: AtomicUsize,
}

#[derive(Debug)]
struct Window<V> {
    by_id: HashMap<Uuid, V>,
    order: VecDeque<Uuid>,
    bytes: usize,
}

/// The key under which a completed job is remembered: its id *and* what it asked for, so that a
/// client that reuses an id for another payload (or another kind) never gets the other job's
/// result. A 128-bit keyed hash, with keys random per process.
#[must_use]
pub fn repeat_key(job_id: Uuid, kind: &str, payload: &[u8]) -> Uuid {
    static STATES: OnceLock<[foldhash::quality::RandomState; 2]> = OnceLock::new();
    let [a, b] = STATES.get_or_init(Default::default);
    let high = a.hash_one((job_id, kind, payload));
    let low = b.hash_one((job_id, kind, payload));
    Uuid::from_u64_pair(high, low)
}

impl<V: Clone> Recent<V> {
    /// A window of `capacity` values; 0 disables it.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self::weighed(capacity, usize::MAX, |_| 0)
    }

    /// A window of at most `capacity` values and `max_bytes` bytes as `weigh` counts them.
    #[must_use]
    pub fn weighed(capacity: usize, max_bytes: usize, weigh: fn(&V) -> usize) -> Self {
        Self {
            capacity,
            max_bytes,
            weigh,
            inner: Mutex::new(Window {
                by_id: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            stored: AtomicUsize::new(0),
        }
    }

    /// The value stored for `job_id`, if it is in the window.
    #[must_use]
    pub fn get(&self, job_id: &Uuid) -> Option<V> {
        if self.capacity == 0 || self.stored.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.lock().by_id.get(job_id).cloned()
    }

    /// Whether `job_id` is in the window.
    #[must_use]
    pub fn contains(&self, job_id: &Uuid) -> bool {
        self.capacity > 0
            && self.stored.load(Ordering::Acquire) > 0
            && self.lock().by_id.contains_key(job_id)
    }

    /// The value already stored for `job_id`, or, when there is none, stores `value` and
    /// answers `None`: one step, so that of two callers racing for one id, one stores and the
    /// other sees what it stored.
    pub fn get_or_insert(&self, job_id: Uuid, value: V) -> Option<V> {
        if self.capacity == 0 {
            return None;
        }
        let mut window = self.lock();
        if let Some(known) = window.by_id.get(&job_id) {
            return Some(known.clone());
        }
        self.insert_locked(&mut window, job_id, value);
        None
    }

    /// Remembers `value` for `job_id`, forgetting the oldest beyond capacity.
    pub fn insert(&self, job_id: Uuid, value: V) {
        if self.capacity == 0 {
            return;
        }
        let mut window = self.lock();
        self.insert_locked(&mut window, job_id, value);
    }

    fn insert_locked(&self, window: &mut Window<V>, job_id: Uuid, value: V) {
        if self.capacity == 0 {
            return;
        }
        let weight = (self.weigh)(&value);
        if weight > self.max_bytes {
            return;
        }
        window.bytes += weight;
        match window.by_id.insert(job_id, value) {
            None => window.order.push_back(job_id),
            Some(old) => window.bytes -= (self.weigh)(&old),
        }
        while window.order.len() > self.capacity || window.bytes > self.max_bytes {
            let Some(old) = window.order.pop_front() else {
                break;
            };
            if let Some(old) = window.by_id.remove(&old) {
                window.bytes -= (self.weigh)(&old);
            }
        }
        self.stored.store(window.by_id.len(), Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Window<V>> {
        // The window holds no invariant a panic elsewhere could break.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_most_recent() {
        let recent = Recent::new(2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            recent.insert(*id, i);
        }
        assert!(recent.get(&ids[0]).is_none());
        assert_eq!(recent.get(&ids[1]), Some(1));
        assert!(recent.contains(&ids[2]));
    }

    #[test]
    fn a_weighed_window_keeps_within_its_bytes() {
        let recent: Recent<Body> = Recent::weighed(100, 10, |b| b.len());
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            recent.insert(*id, Arc::from(&b"abcd"[..]));
        }
        assert!(recent.get(&ids[1]).is_none(), "12 bytes would be over 10");
        assert!(recent.contains(&ids[2]) && recent.contains(&ids[3]));
        recent.insert(Uuid::new_v4(), Arc::from(&[0u8; 11][..]));
        assert!(
            recent.contains(&ids[3]),
            "a value over the limit is not kept at all"
        );
    }

    #[test]
    fn repeat_keys_differ_by_payload_and_kind() {
        let id = Uuid::new_v4();
        let key = repeat_key(id, "k", b"{}");
        assert_eq!(key, repeat_key(id, "k", b"{}"));
        assert_ne!(key, repeat_key(id, "k", b"{ }"));
        assert_ne!(key, repeat_key(id, "other", b"{}"));
        assert_ne!(key, repeat_key(Uuid::new_v4(), "k", b"{}"));
    }

    #[test]
    fn get_or_insert_keeps_the_first_value() {
        let recent = Recent::new(2);
        let id = Uuid::new_v4();
        assert_eq!(recent.get_or_insert(id, 1), None);
        assert_eq!(recent.get_or_insert(id, 2), Some(1));
        assert_eq!(recent.get(&id), Some(1));
    }

    #[test]
    fn zero_capacity_disables_it() {
        let recent = Recent::new(0);
        let id = Uuid::new_v4();
        recent.insert(id, 1);
        assert!(recent.get(&id).is_none());
        assert!(!recent.contains(&id));
    }
}
