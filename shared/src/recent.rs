//! A bounded memory of recent values by job id, forgetting the oldest first.
//!
//! The consumer keeps the results it published recently: at-least-once delivery means a job
//! can arrive again after it was completed (a redelivery after a lost ack, or a producer
//! re-publishing after a lost confirm), and it answers such a repeat with the stored result.
//! `producer serve` keeps results and accepted ids for `GET /jobs/{id}`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use uuid::Uuid;

/// A stored result body, shared without copying.
pub type Body = Arc<[u8]>;

/// Values by job id, at most `capacity` of them.
#[derive(Debug)]
pub struct Recent<V> {
    capacity: usize,
    inner: Mutex<Window<V>>,
}

#[derive(Debug)]
struct Window<V> {
    by_id: HashMap<Uuid, V>,
    order: VecDeque<Uuid>,
}

impl<V: Clone> Recent<V> {
    /// A window of `capacity` values; 0 disables it.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Window {
                by_id: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// The value stored for `job_id`, if it is in the window.
    #[must_use]
    pub fn get(&self, job_id: &Uuid) -> Option<V> {
        if self.capacity == 0 {
            return None;
        }
        self.lock().by_id.get(job_id).cloned()
    }

    /// Whether `job_id` is in the window.
    #[must_use]
    pub fn contains(&self, job_id: &Uuid) -> bool {
        self.capacity > 0 && self.lock().by_id.contains_key(job_id)
    }

    /// Remembers `value` for `job_id`, forgetting the oldest beyond capacity.
    pub fn insert(&self, job_id: Uuid, value: V) {
        if self.capacity == 0 {
            return;
        }
        let mut window = self.lock();
        if window.by_id.insert(job_id, value).is_none() {
            window.order.push_back(job_id);
        }
        while window.order.len() > self.capacity {
            if let Some(old) = window.order.pop_front() {
                window.by_id.remove(&old);
            }
        }
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
    fn zero_capacity_disables_it() {
        let recent = Recent::new(0);
        let id = Uuid::new_v4();
        recent.insert(id, 1);
        assert!(recent.get(&id).is_none());
        assert!(!recent.contains(&id));
    }
}
