//! The bounded send queue of one connection: many producers (fan-out, the session itself), one
//! consumer (the connection's writer).
//!
//! Why not `tokio::sync::mpsc`: a bounded mpsc channel allocates its slots in blocks of 32, about
//! 1.3 KiB per connection before anything is queued — a third of the memory budget of an idle
//! connection. This queue is a `VecDeque` behind a mutex that holds only what is queued, and gives
//! its buffer back when a burst has drained. Producers never wait: [`SendQueue::push_deferred`] fails when
//! the queue is full, and the caller decides (the hub closes the connection as a slow consumer).
//!
//! Full means its frames *or its bytes* ([`Cost`]): a frame is a buffer shared with every other
//! subscriber, but a client that stops reading keeps every buffer it has queued alive after the
//! others have sent theirs, so what it can hold is bounded in bytes (`send_queue_bytes`), whatever
//! the size of the messages.
//!
//! # Deferred wake-ups
//! Fan-out can push without waking the consumer ([`SendQueue::push_deferred`]) and collect the
//! queues to wake in a [`Wakes`] batch, woken together once the producer has handled every
//! message it could read at once. Why: a writer woken for each message writes each frame with its
//! own `send` syscall, which `perf` showed as three quarters of the node's CPU under fan-out
//! (BENCHMARKS.md, *Fan-out*). Woken once per batch, it writes the whole batch in one.
//! Only a push into an empty queue needs a wake: a consumer waits only after it found the queue
//! empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// What a queued item costs against the queue's byte bound.
pub(crate) trait Cost {
    /// Bytes this item holds (an estimate that never undercounts what it keeps alive).
    fn cost(&self) -> usize;
}

/// Bytes counted for a frame beyond its payload: its queue slot and message header.
const FRAME_OVERHEAD: usize = 48;

/// A frame's payload is counted with 1/16 more: what the allocator keeps beside the buffers a
/// client holds (rounding, and free space in per-thread arenas while the queue grows). Measured
/// (`tests/abuse_memory.rs`): without it, the process grew by 0.98–1.01 times the budget.
const ALLOCATOR_SLACK_SHIFT: u32 = 4;

impl Cost for axum::extract::ws::Message {
    fn cost(&self) -> usize {
        use axum::extract::ws::Message;
        let payload = match self {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes.len(),
            Message::Close(frame) => frame.as_ref().map_or(0, |f| f.reason.len()),
        };
        FRAME_OVERHEAD + payload + (payload >> ALLOCATOR_SLACK_SHIFT)
    }
}

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
    /// The consumer's waker. Not a `Notify`: waiting on one takes a `Notified` future in the
    /// consumer's state, and the consumer is every connection's task, idle or not.
    consumer: AtomicWaker,
    capacity: usize,
    /// Most bytes queued (see [`Cost`]); a single item larger than this is still queued into an
    /// empty queue, so that a large message does not close every subscriber.
    max_bytes: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    /// Sum of the [`Cost`] of the items queued and of those taken but not yet
    /// [`SendQueue::written`]: a frame handed to the socket writer stays in its buffer until the
    /// socket takes it, and a client that stops reading must not make that room unbounded.
    bytes: usize,
    closed: bool,
}

impl<T: Cost> SendQueue<T> {
    /// An empty queue holding at most `capacity` items and `max_bytes` bytes.
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        SendQueue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            consumer: AtomicWaker::new(),
            capacity,
            max_bytes,
        }
    }

    /// Queues `item` without waiting, and wakes the consumer.
    #[cfg(test)]
    pub(crate) fn push(&self, item: T) -> Result<(), PushError> {
        self.push_deferred(item)?;
        self.wake();
        Ok(())
    }

    /// Queues `item` without waiting and without waking the consumer; returns whether the
    /// consumer needs a [`SendQueue::wake`] (the queue was empty, so it may be waiting).
    pub(crate) fn push_deferred(&self, item: T) -> Result<bool, PushError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        let cost = item.cost();
        if state.items.len() >= self.capacity
            || (state.bytes > 0 && state.bytes + cost > self.max_bytes)
        {
            return Err(PushError::Full);
        }
        let was_empty = state.items.is_empty();
        state.items.push_back(item);
        state.bytes += cost;
        Ok(was_empty)
    }

    /// The next item without waiting, if any. Its cost stays counted against the byte bound
    /// until the caller reports it [`SendQueue::written`].
    pub(crate) fn try_pop(&self) -> Option<T> {
        let mut state = self.lock();
        let item = state.items.pop_front();
        if state.items.is_empty() && state.items.capacity() >= SHRINK_ABOVE {
            state.items = VecDeque::new();
        }
        item
    }

    /// The next item, or `Pending` with the consumer's waker registered; `None` once closed and
    /// empty. Like [`SendQueue::try_pop`], its cost stays counted until written.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // Registered before looking: a push after the look wakes this waker.
        self.consumer.register(cx.waker());
        if let Some(item) = self.try_pop() {
            return Poll::Ready(Some(item));
        }
        if self.lock().closed {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// The next item, waiting for one; `None` once closed and empty.
    #[cfg(test)]
    pub(crate) async fn pop(&self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_pop(cx)).await
    }
}

impl<T> SendQueue<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the consumer (after [`SendQueue::push_deferred`]).
    pub(crate) fn wake(&self) {
        self.consumer.wake();
    }

    /// The consumer has written items of this total [`Cost`] out of its hands: room for as much.
    pub(crate) fn written(&self, bytes: usize) {
        let mut state = self.lock();
        state.bytes = state.bytes.saturating_sub(bytes);
    }

    /// Refuses further pushes (the consumer is leaving).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake();
    }
}

/// Queues pushed to with [`SendQueue::push_deferred`] whose consumers still need a wake. See the
/// module docs. Dropping the batch wakes them, so no wake-up is ever lost.
#[derive(Debug)]
pub(crate) struct Wakes<T> {
    queues: Vec<Arc<SendQueue<T>>>,
    /// Messages delivered since the last [`Wakes::wake_all`].
    messages: usize,
}

impl<T> Default for Wakes<T> {
    fn default() -> Self {
        Wakes {
            queues: Vec::new(),
            messages: 0,
        }
    }
}

impl<T> Wakes<T> {
    /// Most messages a batch holds back before it wakes its consumers anyway: bounds the delay
    /// a busy publisher adds to the first of them.
    pub(crate) const MAX_MESSAGES: usize = 32;

    /// Remembers that `queue`'s consumer needs a wake.
    pub(crate) fn add(&mut self, queue: &Arc<SendQueue<T>>) {
        self.queues.push(queue.clone());
    }

    /// Counts one message delivered into the batch; wakes everyone once it holds
    /// [`Wakes::MAX_MESSAGES`].
    pub(crate) fn message_done(&mut self) {
        self.messages += 1;
        if self.messages >= Self::MAX_MESSAGES {
            self.wake_all();
        }
    }

    /// Consumers waiting for [`Wakes::wake_all`].
    pub(crate) fn pending(&self) -> usize {
        self.queues.len()
    }

    /// Wakes every consumer collected so far.
    pub(crate) fn wake_all(&mut self) {
        self.messages = 0;
        for queue in self.queues.drain(..) {
            queue.wake();
        }
    }
}

impl<T> Drop for Wakes<T> {
    fn drop(&mut self) {
        self.wake_all();
    }
}

#[cfg(test)]
impl Cost for i32 {
    fn cost(&self) -> usize {
        // Tests give an item's cost as its value.
        (*self).max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_in_bytes_but_takes_one_large_item_when_empty() {
        let queue = SendQueue::new(100, 10);
        assert_eq!(queue.push(6), Ok(()));
        assert_eq!(queue.push(4), Ok(()));
        assert_eq!(queue.push(1), Err(PushError::Full));
        assert_eq!(queue.try_pop(), Some(6));
        queue.written(6);
        assert_eq!(queue.push(5), Ok(()));
        assert_eq!(queue.push(2), Err(PushError::Full));
        while let Some(item) = queue.try_pop() {
            queue.written(item as usize);
        }
        assert_eq!(
            queue.push(50),
            Ok(()),
            "one item larger than the bound, alone"
        );
        assert_eq!(queue.push(0), Err(PushError::Full));
    }

    #[test]
    fn what_was_taken_counts_until_it_is_written() {
        let queue = SendQueue::new(100, 10);
        assert_eq!(queue.push(8), Ok(()));
        assert_eq!(queue.try_pop(), Some(8));
        // Taken, not yet written: the writer's buffer holds it.
        assert_eq!(queue.push(3), Err(PushError::Full));
        queue.written(8);
        assert_eq!(queue.push(3), Ok(()));
    }

    #[test]
    fn full_and_closed_are_reported() {
        let queue = SendQueue::new(2, usize::MAX);
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
        let queue = std::sync::Arc::new(SendQueue::new(4, usize::MAX));
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

    #[tokio::test]
    async fn deferred_pushes_wake_the_consumer_once_the_batch_wakes() {
        let queue = Arc::new(SendQueue::new(8, usize::MAX));
        let consumer = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.pop().await })
        };
        // Current-thread runtime: one yield lets the consumer find the queue empty and wait.
        tokio::task::yield_now().await;
        assert!(!consumer.is_finished());
        let mut wakes = Wakes::default();
        assert_eq!(queue.push_deferred(1), Ok(true));
        wakes.add(&queue);
        assert_eq!(
            queue.push_deferred(2),
            Ok(false),
            "not empty: no wake needed"
        );
        tokio::task::yield_now().await;
        assert!(!consumer.is_finished(), "woken before the batch woke it");
        wakes.wake_all();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), consumer).await;
        assert_eq!(got.expect("woken").unwrap(), Some(1));
        assert_eq!(queue.try_pop(), Some(2));
    }

    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let queue = SendQueue::new(1000, usize::MAX);
        for i in 0..500 {
            queue.push(i).unwrap();
        }
        while queue.try_pop().is_some() {}
        assert_eq!(queue.lock().items.capacity(), 0);
    }
}
