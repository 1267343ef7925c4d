//! The one connect path with a timeout, shared by the pool and the
//! listener.
//!
//! The driver's own connect timeout covers only the TCP handshake: a server
//! or path that accepts the connection and then stops answering would hold
//! the caller for as long as it stays silent. So a connect runs on a helper
//! thread and is given up on at the timeout; the helper ends by itself when
//! the peer answers or the socket dies, and drops what it made. A bounded
//! number of such connects may be left running at once.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::error::{Error, Result};

/// Connects given up on that have not ended yet, and how many may be.
#[derive(Debug)]
pub(crate) struct Abandoned {
    running: Arc<AtomicUsize>,
    max: usize,
}

impl Abandoned {
    /// At most `max` abandoned connects at once; past that, a connect
    /// that would need a helper fails at once with the timeout's error.
    pub(crate) fn new(max: usize) -> Abandoned {
        Abandoned {
            running: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }
}

/// Runs `work` (a connect) within `limit`, on a helper thread named
/// `thread_name`: its result, or `timed_out()` once `limit` has passed.
pub(crate) fn within_timeout<T: Send + 'static>(
    limit: Duration,
    abandoned: &Abandoned,
    thread_name: &str,
    timed_out: impl Fn() -> Error,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if abandoned.running.load(Ordering::Acquire) >= abandoned.max {
        return Err(timed_out());
    }
    // Whoever moves it from WAITING first decides: the helper delivers,
    // or the caller gives up and the helper counts itself out when it
    // ends.
    const WAITING: u8 = 0;
    const DELIVERED: u8 = 1;
    const ABANDONED: u8 = 2;
    let outcome = Arc::new(AtomicU8::new(WAITING));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (helper_outcome, running) = (Arc::clone(&outcome), Arc::clone(&abandoned.running));
    thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || {
            let made = work();
            let decided = helper_outcome.compare_exchange(
                WAITING,
                DELIVERED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            match decided {
                Ok(_) => drop(tx.send(made)),
                Err(_) => {
                    running.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(Error::thread_start("a connect thread"))?;
    match rx.recv_timeout(limit) {
        Ok(made) => made,
        Err(_) => {
            abandoned.running.fetch_add(1, Ordering::AcqRel);
            let gave_up =
                outcome.compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
            if gave_up.is_ok() {
                return Err(timed_out());
            }
            // Delivered just now: take it.
            abandoned.running.fetch_sub(1, Ordering::AcqRel);
            rx.recv().unwrap_or_else(|_| Err(timed_out()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> Error {
        Error::invalid_config("timed out")
    }

    #[test]
    fn a_quick_connect_is_delivered() {
        let abandoned = Abandoned::new(1);
        let got = within_timeout(Duration::from_secs(60), &abandoned, "t", timeout, || Ok(7));
        assert_eq!(got.unwrap(), 7);
        assert_eq!(abandoned.running.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_silent_connect_is_given_up_and_counted_until_it_ends() {
        let abandoned = Abandoned::new(1);
        let (release, held) = crossbeam_channel::bounded::<()>(0);
        let (ended_tx, ended) = crossbeam_channel::bounded::<()>(1);
        let got = within_timeout(
            Duration::from_millis(1),
            &abandoned,
            "t",
            timeout,
            move || {
                let _ = held.recv();
                let _ = ended_tx.send(());
                Ok(1)
            },
        );
        assert!(got.is_err());
        // The limit is reached: the next connect fails without a thread.
        let refused = within_timeout(Duration::from_secs(60), &abandoned, "t", timeout, || Ok(2));
        assert!(refused.is_err());
        drop(release);
        ended.recv().unwrap();
        // The helper counts itself out right after it ends; a busy machine
        // may take a while to run it.
        for _ in 0..30_000 {
            if abandoned.running.load(Ordering::Acquire) == 0 {
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
        panic!("the abandoned connect was never counted out");
    }
}
