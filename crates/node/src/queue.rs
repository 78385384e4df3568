//! The bounded send queue of one connection: many producers (fan-out, the session itself), one
//! consumer (the connection's writer).
//!
//! Why not `tokio::sync::mpsc`: a bounded mpsc channel allocates its slots in blocks of 32, about
//! 1.3 KiB per connection before anything is queued — a third of the memory budget of an idle
//! connection. This queue is a `VecDeque` behind a mutex that holds only what is queued, and gives
//! its buffer back when a burst has drained. Producers never wait: [`SendQueue::push`] fails when
//! the queue is full, and the caller decides (the hub closes the connection as a slow consumer).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// A buffer this large or larger is released once the queue is empty again.
const SHRINK_ABOVE: usize = 64;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue holds its capacity.
    Full,
    /// The consumer is gone.
    Closed,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct SendQueue<T> {
    state: Mutex<State<T>>,
    /// Wakes the consumer; holds one permit when it is not waiting.
    ready: Notify,
    capacity: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> SendQueue<T> {
    /// An empty queue holding at most `capacity` items.
    pub(crate) fn new(capacity: usize) -> Self {
        SendQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` without waiting.
    pub(crate) fn push(&self, item: T) -> Result<(), PushError> {
        {
            let mut state = self.lock();
            if state.closed {
                return Err(PushError::Closed);
            }
            if state.items.len() >= self.capacity {
                return Err(PushError::Full);
            }
            state.items.push_back(item);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// The next item without waiting, if any.
    pub(crate) fn try_pop(&self) -> Option<T> {
        let mut state = self.lock();
        let item = state.items.pop_front();
        if state.items.is_empty() && state.items.capacity() >= SHRINK_ABOVE {
            state.items = VecDeque::new();
        }
        item
    }

    /// The next item, waiting for one; `None` once closed and empty.
    pub(crate) async fn pop(&self) -> Option<T> {
        loop {
            if let Some(item) = self.try_pop() {
                return Some(item);
            }
            if self.lock().closed {
                return None;
            }
            // A push between the check above and this wait left a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }

    /// Refuses further pushes (the consumer is leaving).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_closed_are_reported() {
        let queue = SendQueue::new(2);
        assert_eq!(queue.push(1), Ok(()));
        assert_eq!(queue.push(2), Ok(()));
        assert_eq!(queue.push(3), Err(PushError::Full));
        assert_eq!(queue.try_pop(), Some(1));
        queue.close();
        assert_eq!(queue.push(4), Err(PushError::Closed));
        assert_eq!(queue.try_pop(), Some(2));
        assert_eq!(queue.try_pop(), None);
    }

    #[tokio::test]
    async fn pop_waits_for_a_push_and_ends_when_closed() {
        let queue = std::sync::Arc::new(SendQueue::new(4));
        let consumer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(item) = queue.pop().await {
                    got.push(item);
                }
                got
            })
        };
        for i in 0..3 {
            queue.push(i).unwrap();
            tokio::task::yield_now().await;
        }
        queue.close();
        assert_eq!(consumer.await.unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let queue = SendQueue::new(1000);
        for i in 0..500 {
            queue.push(i).unwrap();
        }
        while queue.try_pop().is_some() {}
        assert_eq!(queue.lock().items.capacity(), 0);
    }
}
