//! A bounded memory of the results this process published recently, by job id.
//!
//! At-least-once delivery means a job can arrive again after it was completed: a redelivery
//! after a lost ack, or a producer re-publishing after a lost confirm. When the job id is in
//! this window, the worker re-publishes the stored result instead of running the chain again.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use uuid::Uuid;

/// Most recent results kept by default.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Completed results by job id, forgetting the oldest beyond its capacity.
#[derive(Debug)]
pub struct RecentResults {
    capacity: usize,
    inner: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    by_id: HashMap<Uuid, Arc<[u8]>>,
    order: VecDeque<Uuid>,
}

impl RecentResults {
    /// A window of `capacity` results; 0 disables it.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Window::default()),
        }
    }

    /// The stored result body of `job_id`, if it is in the window.
    #[must_use]
    pub fn get(&self, job_id: &Uuid) -> Option<Arc<[u8]>> {
        if self.capacity == 0 {
            return None;
        }
        self.lock().by_id.get(job_id).cloned()
    }

    /// Remembers `body` as the result of `job_id`, forgetting the oldest beyond capacity.
    pub fn insert(&self, job_id: Uuid, body: Arc<[u8]>) {
        if self.capacity == 0 {
            return;
        }
        let mut window = self.lock();
        if window.by_id.insert(job_id, body).is_none() {
            window.order.push_back(job_id);
        }
        while window.order.len() > self.capacity {
            if let Some(old) = window.order.pop_front() {
                window.by_id.remove(&old);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window holds no invariant a panic elsewhere could break.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_most_recent() {
        let recent = RecentResults::new(2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            recent.insert(*id, Arc::from(vec![i as u8]));
        }
        assert!(recent.get(&ids[0]).is_none());
        assert_eq!(recent.get(&ids[1]).as_deref(), Some(&[1u8][..]));
        assert_eq!(recent.get(&ids[2]).as_deref(), Some(&[2u8][..]));
    }

    #[test]
    fn zero_capacity_disables_it() {
        let recent = RecentResults::new(0);
        let id = Uuid::new_v4();
        recent.insert(id, Arc::from(vec![1]));
        assert!(recent.get(&id).is_none());
    }
}
