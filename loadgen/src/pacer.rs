//! Wake-ups at the schedule's times, finer than the runtime's timer.
//!
//! monoio's timer wheel rounds every deadline up to the next millisecond
//! and then fires on the tick after, so a send due at `t` went out 1 to 2 ms
//! late, and since latency is timed from `t` that lag was charged to the
//! server. A [`Pacer`] is a helper thread that sleeps on a condition
//! variable (futex timeouts are good to tens of microseconds) and wakes the
//! worker's schedule task across threads when the next send is due.

use std::future::poll_fn;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

/// A helper thread that wakes one task at a given instant. Created by the
/// schedule task when traffic starts; dropping it stops the thread.
#[derive(Debug)]
pub(crate) struct Pacer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// When to wake `waker`; `None` when nobody waits.
    due: Option<Instant>,
    waker: Option<Waker>,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under every panic point, so a poisoned
        // lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pacer {
    /// Starts the helper thread.
    pub fn start(name: String) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || wake_loop(&theirs))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Returns at `due` or just after it.
    pub async fn sleep_until(&self, due: Instant) {
        poll_fn(|cx| {
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            let mut s = self.shared.lock();
            s.due = Some(due);
            s.waker = Some(cx.waker().clone());
            drop(s);
            self.shared.changed.notify_one();
            Poll::Pending
        })
        .await;
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_one();
        if let Some(t) = self.thread.take() {
            // The loop has no panic point; joining only waits for it to see `stop`.
            let _ = t.join();
        }
    }
}

fn wake_loop(shared: &Shared) {
    let mut s = shared.lock();
    loop {
        if s.stop {
            return;
        }
        let Some(due) = s.due else {
            s = shared
                .changed
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        let now = Instant::now();
        if now < due {
            s = shared
                .changed
                .wait_timeout(s, due - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }
        s.due = None;
        if let Some(w) = s.waker.take() {
            drop(s);
            w.wake();
            s = shared.lock();
        }
    }
}
