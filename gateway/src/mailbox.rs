//! A multi-producer, single-consumer queue with batched wake-ups.
//!
//! Producers on any thread push; the one consumer (a task on a gateway core)
//! drains everything queued at once. A producer wakes the consumer only when
//! the consumer has not been notified since its last drain, so under load a
//! burst of pushes costs one wake-up, not one per item.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;

/// The queue. Shared behind an `Arc` between producers and the consumer.
#[derive(Debug, Default)]
pub struct Mailbox<T> {
    queue: SegQueue<T>,
    waker: AtomicWaker,
    /// Set by the first push after a drain; cleared by the consumer before
    /// it drains. While set, pushes do not wake.
    notified: AtomicBool,
}

impl<T> Mailbox<T> {
    /// An empty mailbox.
    pub fn new() -> Self {
        Self {
            queue: SegQueue::new(),
            waker: AtomicWaker::new(),
            notified: AtomicBool::new(false),
        }
    }

    /// Queues `item`, waking the consumer if it may be asleep.
    pub fn push(&self, item: T) {
        self.queue.push(item);
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Waits until at least one item is queued, then moves every queued item
    /// into `out`. Only one task may call this.
    pub async fn recv_batch(&self, out: &mut Vec<T>) {
        poll_fn(|cx| {
            // Register before clearing the flag and draining: a push that
            // lands after the drain sees the flag clear and wakes us.
            self.waker.register(cx.waker());
            self.notified.store(false, Ordering::Release);
            while let Some(item) = self.queue.pop() {
                out.push(item);
            }
            if out.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn every_item_arrives_once_across_threads() {
        let mailbox = Arc::new(Mailbox::new());
        let producers: Vec<_> = (0..4u64)
            .map(|p| {
                let mb = mailbox.clone();
                std::thread::spawn(move || (0..10_000u64).for_each(|i| mb.push(p * 1_000_000 + i)))
            })
            .collect();
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime");
        let (got, batches) = rt.block_on(async {
            let mut got = Vec::new();
            let mut batches = 0;
            while got.len() < 40_000 {
                let mut batch = Vec::new();
                mailbox.recv_batch(&mut batch).await;
                batches += 1;
                got.extend(batch);
            }
            (got, batches)
        });
        producers
            .into_iter()
            .for_each(|p| p.join().expect("producer"));
        let mut sorted = got.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 40_000);
        assert!(batches < 40_000, "pushes were batched ({batches} wake-ups)");
    }
}
