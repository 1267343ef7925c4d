//! Connection affinity: a thread gets back the connection it used last.
//!
//! r2d2 keeps its idle connections on one stack under one lock, so a
//! thread's next call usually runs on a connection another thread used
//! last, and every check-out and return takes a lock that all threads
//! share. On a machine where client and server share the cores, both cost
//! the server throughput: sockets handed between threads cost the kernel
//! and the scheduler more, and a lock's cache line moving between cores on
//! every call (and the sleeps when its holder is preempted) cost about 5%
//! of a one-row read's rate at 8 threads.
//!
//! So a connection returned by a call is parked here, in a slot of its
//! own, marked with the thread that used it, and that thread takes it back
//! from the same slot on its next call: a lock only it usually touches.
//! The connection stays checked out from r2d2's point of view while
//! parked.
//!
//! Parked connections are never left unused while a caller waits: a
//! caller that finds neither its own connection nor an idle one in r2d2
//! takes any parked one, and while some caller waits inside r2d2 for a
//! connection, returned connections go back to r2d2 instead of staying
//! parked, so that the waiting caller gets them. A waiter counts itself
//! before its last look at the slots and a parker looks at the count after
//! parking, each behind a full fence, so at least one of them sees the
//! other: no return slips between a caller's last look and its wait.
//!
//! The pool runs [`Parking::release_stale`] every [`PARK_LIMIT`]: a
//! connection still parked at the second run after it was parked (between
//! one and two limits later) goes back to r2d2, so that r2d2's idle timeout
//! and maximum lifetime still apply to it.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

/// How often parked connections are looked at: one stays parked for its
/// thread between one and two of these before r2d2 gets it back (and
/// counts it idle from then on).
pub(crate) const PARK_LIMIT: Duration = Duration::from_secs(1);

/// Connections parked for the thread that used them last.
pub(crate) struct Parking<C> {
    /// This lot's number, for the threads' memory of their slots.
    lot: u64,
    /// One per connection the pool may open, so that every returned
    /// connection finds a free slot.
    slots: Box<[Slot<C>]>,
    /// Callers waiting inside r2d2 for a connection.
    waiting: AtomicUsize,
    /// Runs of [`Parking::release_stale`] so far (a clock cheaper to read
    /// than the time).
    sweeps: AtomicU64,
}

/// A slot on a cache line of its own (128 bytes: adjacent lines are
/// fetched in pairs), so that threads using their own slots do not slow
/// each other down.
#[repr(align(128))]
struct Slot<C> {
    parked: Mutex<Option<Parked<C>>>,
}

impl<C> Slot<C> {
    fn lock(&self) -> MutexGuard<'_, Option<Parked<C>>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot's lock unless another thread holds it.
    fn try_lock(&self) -> Option<MutexGuard<'_, Option<Parked<C>>>> {
        match self.parked.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

struct Parked<C> {
    conn: C,
    owner: u64,
    /// [`Parking::sweeps`] when it was parked.
    since: u64,
}

thread_local! {
    /// This thread's mark on the connections it parks.
    static MARK: Cell<u64> = const { Cell::new(0) };
    /// The slot this thread parks in, per lot: (lot, slot), the most
    /// recently placed last, at most [`HOMES_KEPT`].
    static HOMES: RefCell<Vec<(u64, usize)>> = const { RefCell::new(Vec::new()) };
}

/// How many lots a thread remembers its slot in: a thread that uses more
/// pools than this (or pools that come and go) forgets the oldest, whose
/// next return then looks for a free slot again.
const HOMES_KEPT: usize = 8;

/// A number never reused within the process: lots and thread marks.
fn next_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// This thread's mark (cheaper to read than `thread::current().id()`).
fn thread_mark() -> u64 {
    MARK.with(|mark| {
        if mark.get() == 0 {
            mark.set(next_number());
        }
        mark.get()
    })
}

impl<C> Parking<C> {
    /// A lot with `capacity` slots: the pool's maximum size.
    pub fn new(capacity: usize) -> Self {
        Parking {
            lot: next_number(),
            slots: (0..capacity.max(1))
                .map(|_| Slot {
                    parked: Mutex::new(None),
                })
                .collect(),
            waiting: AtomicUsize::new(0),
            sweeps: AtomicU64::new(0),
        }
    }

    /// The slot this thread parked in last.
    fn home(&self) -> Option<usize> {
        HOMES.with(|homes| {
            homes
                .borrow()
                .iter()
                .find(|(lot, _)| *lot == self.lot)
                .map(|(_, slot)| *slot)
        })
    }

    fn set_home(&self, slot: usize) {
        HOMES.with(|homes| {
            let mut homes = homes.borrow_mut();
            if let Some(at) = homes.iter().position(|(lot, _)| *lot == self.lot) {
                homes.remove(at);
            } else if homes.len() >= HOMES_KEPT {
                homes.remove(0);
            }
            homes.push((self.lot, slot));
        });
    }

    /// The connection this thread parked, if no other thread took it.
    pub fn take_own(&self) -> Option<C> {
        let slot = self.home()?;
        let mark = thread_mark();
        let mut parked = self.slots[slot].lock();
        if parked.as_ref().is_some_and(|p| p.owner == mark) {
            parked.take().map(|p| p.conn)
        } else {
            None
        }
    }

    /// Any parked connection. Slots another thread is using at the moment
    /// are skipped; each thread starts looking at a different slot.
    pub fn take_any(&self) -> Option<C> {
        let n = self.slots.len();
        let start = usize::try_from(thread_mark()).unwrap_or(0) % n;
        (0..n).find_map(|i| {
            self.slots[(start + i) % n]
                .try_lock()
                .and_then(|mut parked| parked.take())
                .map(|p| p.conn)
        })
    }

    /// Counts the caller as waiting, then looks once more for a parked
    /// connection. With `Some`, the caller is not counted and takes it;
    /// with `None`, it waits in r2d2 and calls [`Parking::done_waiting`]
    /// after.
    pub fn begin_wait(&self) -> Option<C> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let found = self.take_any();
        if found.is_some() {
            self.done_waiting();
        }
        found
    }

    /// Ends a wait begun with [`Parking::begin_wait`].
    pub fn done_waiting(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Parks `conn` for this thread, or returns it when a caller waits in
    /// r2d2 (which gets it when the caller drops it) or no slot is free.
    pub fn park(&self, conn: C) -> Option<C> {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return Some(conn);
        }
        let mark = thread_mark();
        let parked = Parked {
            conn,
            owner: mark,
            since: self.sweeps.load(Ordering::Relaxed),
        };
        let slot = match self.park_at_home(parked) {
            Ok(slot) => slot,
            Err(parked) => match self.park_elsewhere(parked) {
                Ok(slot) => slot,
                Err(conn) => return Some(conn),
            },
        };
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return None;
        }
        // A caller began to wait meanwhile: hand the connection to r2d2,
        // unless a caller took it already (only this thread parks with
        // its mark, so a connection with it is the one just parked).
        let mut parked = self.slots[slot].lock();
        if parked.as_ref().is_some_and(|p| p.owner == mark) {
            parked.take().map(|p| p.conn)
        } else {
            None
        }
    }

    /// Parks in this thread's slot when it is free.
    fn park_at_home(&self, parked: Parked<C>) -> Result<usize, Parked<C>> {
        let Some(slot) = self.home() else {
            return Err(parked);
        };
        let mut guard = self.slots[slot].lock();
        if guard.is_some() {
            return Err(parked);
        }
        *guard = Some(parked);
        Ok(slot)
    }

    /// Parks in a free slot, which becomes this thread's; gives the
    /// connection back when every free slot is in use at the moment.
    fn park_elsewhere(&self, parked: Parked<C>) -> Result<usize, C> {
        let n = self.slots.len();
        let start = usize::try_from(parked.owner).unwrap_or(0) % n;
        for i in 0..n {
            let slot = (start + i) % n;
            if let Some(mut guard) = self.slots[slot].try_lock() {
                if guard.is_none() {
                    *guard = Some(parked);
                    drop(guard);
                    self.set_home(slot);
                    return Ok(slot);
                }
            }
        }
        Err(parked.conn)
    }

    /// How many connections are parked.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.lock().is_some()).count()
    }

    /// Takes out the connections parked before the previous run of this
    /// function, for the caller to drop outside the locks.
    pub fn release_stale(&self) -> Vec<C> {
        let before = self.sweeps.fetch_add(1, Ordering::Relaxed);
        self.slots
            .iter()
            .filter_map(|slot| {
                let mut parked = slot.lock();
                if parked.as_ref().is_some_and(|p| p.since < before) {
                    parked.take().map(|p| p.conn)
                } else {
                    None
                }
            })
            .collect()
    }

    /// How many callers wait in r2d2.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn a_thread_gets_back_what_it_parked() {
        let parking = Arc::new(Parking::new(4));
        assert!(parking.park("main").is_none());
        let other = Arc::clone(&parking);
        thread::spawn(move || assert!(other.park("other").is_none()))
            .join()
            .unwrap();
        // The other thread parked last; this one still gets its own.
        assert_eq!(parking.take_own(), Some("main"));
        assert_eq!(parking.take_own(), None);
        assert_eq!(parking.len(), 1);
        // And parks in the same slot again.
        assert!(parking.park("main").is_none());
        assert_eq!(parking.take_own(), Some("main"));
    }

    #[test]
    fn without_its_own_a_caller_takes_any_parked_one() {
        let parking = Arc::new(Parking::new(4));
        for name in ["first", "second"] {
            let other = Arc::clone(&parking);
            thread::spawn(move || assert!(other.park(name).is_none()))
                .join()
                .unwrap();
        }
        assert_eq!(parking.take_own(), None);
        let mut taken = [parking.take_any(), parking.take_any()];
        taken.sort();
        assert_eq!(taken, [Some("first"), Some("second")]);
        assert_eq!(parking.take_any(), None);
    }

    #[test]
    fn a_thread_remembers_its_slot_in_the_lots_it_used_last() {
        let lots: Vec<Parking<usize>> = (0..HOMES_KEPT + 2).map(|_| Parking::new(4)).collect();
        for (i, lot) in lots.iter().enumerate() {
            assert!(lot.park(i).is_none());
            assert_eq!(lot.take_own(), Some(i));
            assert!(lot.park(i).is_none());
        }
        let remembered = HOMES.with(|homes| homes.borrow().len());
        assert_eq!(remembered, HOMES_KEPT);
        // The oldest lots are forgotten: their connections are taken as
        // anyone's, and the lot is remembered again at the next return.
        assert_eq!(lots[0].take_own(), None);
        assert_eq!(lots[0].take_any(), Some(0));
        assert!(lots[0].park(0).is_none());
        assert_eq!(lots[0].take_own(), Some(0));
        let last = HOMES_KEPT + 1;
        assert_eq!(lots[last].take_own(), Some(last));
    }

    #[test]
    fn a_full_lot_gives_the_connection_back() {
        let parking = Arc::new(Parking::new(1));
        let other = Arc::clone(&parking);
        thread::spawn(move || assert!(other.park("theirs").is_none()))
            .join()
            .unwrap();
        assert_eq!(parking.park("mine"), Some("mine"));
    }

    #[test]
    fn while_a_caller_waits_nothing_stays_parked() {
        let parking = Parking::new(4);
        assert_eq!(parking.begin_wait(), None);
        assert_eq!(parking.waiting(), 1);
        // Returned to the caller, to go back to r2d2 and the waiting caller.
        assert_eq!(parking.park("returned"), Some("returned"));
        assert_eq!(parking.len(), 0);
        parking.done_waiting();
        assert_eq!(parking.park("returned"), None);
        assert_eq!(parking.len(), 1);
        // A caller about to wait takes a parked connection instead.
        assert_eq!(parking.begin_wait(), Some("returned"));
        assert_eq!(parking.waiting(), 0);
    }

    #[test]
    fn connections_parked_for_a_whole_period_are_released() {
        let parking = Parking::new(4);
        assert!(parking.park("old").is_none());
        // Parked less than a period ago, perhaps just now.
        assert_eq!(parking.release_stale(), Vec::<&str>::new());
        assert_eq!(parking.take_own(), Some("old"));
        assert!(parking.park("old").is_none());
        assert_eq!(parking.release_stale(), Vec::<&str>::new());
        assert_eq!(parking.release_stale(), vec!["old"]);
        assert_eq!(parking.take_own(), None);
    }
}
