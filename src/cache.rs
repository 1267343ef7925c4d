//! A local map of decoded states kept fresh by the change feed: the seed's
//! "reload the actor when it changes", done once for everyone.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use serde::de::DeserializeOwned;

use crate::change::Event;
use crate::error::Result;
use crate::listener::{CallbackHandle, ChangeListener};
use crate::store::StateStore;

/// How often one `get` chases an actor that keeps changing while it loads
/// before it settles for the newest version it read.
const MAX_CHASES: usize = 8;

enum Slot<T> {
    /// Loaded: the state (`None` when the actor does not exist) and the
    /// sequence number it was read at.
    Ready {
        value: Option<Arc<T>>,
        sequence: u64,
    },
    /// A `get` is loading it; `announced` is the highest sequence number
    /// announced meanwhile.
    Loading { announced: u64 },
}

struct Core<T> {
    store: StateStore,
    /// False once the change feed has ended: nothing is held any more and
    /// every `get` reads the store.
    live: AtomicBool,
    slots: RwLock<HashMap<String, Slot<T>>>,
    /// Bumped on every resync, so that a load that overlapped one is
    /// repeated.
    generation: AtomicU64,
}

impl<T: DeserializeOwned> Core<T> {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Slot<T>>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Slot<T>>> {
        self.slots.write().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, event: Event) {
        match event {
            Event::Change(change) => {
                {
                    let mut slots = self.write();
                    match slots.get_mut(&change.actor_id) {
                        None => return,
                        Some(Slot::Loading { announced }) => {
                            *announced = (*announced).max(change.sequence);
                            return;
                        }
                        Some(Slot::Ready { sequence, .. }) if *sequence >= change.sequence => {
                            return
                        }
                        Some(_) => {}
                    }
                }
                // Deletes too are read back rather than believed: any role
                // that may connect may NOTIFY the channel, and a forged
                // delete with a huge sequence number would otherwise empty
                // the slot and hide every later change.
                self.reload(&change.actor_id);
            }
            Event::Resync(_) => self.reload_all(),
        }
    }

    /// Reads one actor again after it was announced.
    fn reload(&self, id: &str) {
        match self.store.load_versioned::<T>(id) {
            Ok(loaded) => {
                let (value, sequence) = match loaded {
                    Some(v) => (Some(Arc::new(v.value)), v.sequence),
                    None => (None, 0),
                };
                let mut slots = self.write();
                if let Some(slot @ Slot::Ready { .. }) = slots.get_mut(id) {
                    if matches!(slot, Slot::Ready { sequence: s, .. } if *s < sequence || value.is_none())
                    {
                        *slot = Slot::Ready { value, sequence };
                    }
                }
            }
            Err(e) => {
                // Forget it: the next `get` reads it afresh.
                log::warn!("cache could not reload actor {id:?}: {e}");
                self.write().remove(id);
            }
        }
    }

    /// Reads every held actor again, in one query, after a gap.
    fn reload_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let ids: Vec<String> = self
            .read()
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Ready { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        if ids.is_empty() {
            return;
        }
        let loaded = match self.store.load_many_versioned_bytes(&ids) {
            Ok(loaded) => loaded,
            Err(e) => {
                log::warn!("cache could not reload after a gap, emptying it: {e}");
                self.write()
                    .retain(|_, slot| matches!(slot, Slot::Loading { .. }));
                return;
            }
        };
        let codec = self.store.codec();
        let mut slots = self.write();
        for id in ids {
            let Some(slot @ Slot::Ready { .. }) = slots.get_mut(&id) else {
                continue;
            };
            let Slot::Ready { sequence, .. } = slot else {
                continue;
            };
            match loaded.get(&id) {
                None => {
                    *slot = Slot::Ready {
                        value: None,
                        sequence: *sequence,
                    }
                }
                Some(v) if v.sequence >= *sequence => match codec.decode::<T>(&v.value) {
                    Ok(value) => {
                        *slot = Slot::Ready {
                            value: Some(Arc::new(value)),
                            sequence: v.sequence,
                        }
                    }
                    Err(e) => {
                        log::warn!("cache could not decode actor {id:?}: {e}");
                        slots.remove(&id);
                    }
                },
                Some(_) => {}
            }
        }
    }
}

/// Decoded states of the actors you ask for, kept fresh by a
/// [`ChangeListener`]: an actor is read again when a newer sequence number
/// is announced, marked absent when it is deleted, and everything held is
/// read again in one query after any `Resync`.
///
/// [`get`](Self::get) reads the network only for an actor the cache does not
/// hold yet; after that, reads are a map lookup under a read lock. Updates
/// are applied on the listener subscription's own thread, never on the
/// caller's.
///
/// Cheap to clone; the updating thread stops when the last clone is dropped.
/// The cache keeps its listener running; if the listener is shut down
/// explicitly, the cache empties itself and every `get` reads the store.
///
/// ```no_run
/// use trebuchet_postgres::{StateCache, StateStore};
///
/// let store = StateStore::connect("postgresql://localhost/trebuchet")?;
/// let listener = store.listener()?;
/// let cache: StateCache<u64> = StateCache::new(&store, &listener)?;
/// let score = cache.get("player-1")?; // loads once, then stays fresh
/// # Ok::<(), trebuchet_postgres::Error>(())
/// ```
pub struct StateCache<T> {
    core: Arc<Core<T>>,
    feed: Arc<Feed>,
}

/// Keeps the listener alive and the updating thread running for as long as
/// a cache exists.
struct Feed {
    _handler: CallbackHandle,
    _listener: ChangeListener,
}

impl<T> Clone for StateCache<T> {
    fn clone(&self) -> Self {
        StateCache {
            core: Arc::clone(&self.core),
            feed: Arc::clone(&self.feed),
        }
    }
}

impl<T> fmt::Debug for StateCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.core.slots.read().map(|s| s.len()).unwrap_or_default();
        f.debug_struct("StateCache")
            .field("store", &self.core.store)
            .field("held", &held)
            .finish()
    }
}

impl<T> StateCache<T>
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    /// A cache over `store`, updated by `listener` (which must listen on the
    /// store's channel, as [`StateStore::listener`] does).
    ///
    /// # Errors
    ///
    /// When the updating thread cannot be started.
    pub fn new(store: &StateStore, listener: &ChangeListener) -> Result<StateCache<T>> {
        let core = Arc::new(Core {
            store: store.clone(),
            live: AtomicBool::new(true),
            slots: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
        });
        let weak: Weak<Core<T>> = Arc::downgrade(&core);
        let ended = Weak::clone(&weak);
        let handler = listener.subscribe().spawn_handler(
            "trebuchet-cache",
            move |event| {
                if let Some(core) = weak.upgrade() {
                    core.apply(event);
                }
            },
            move || {
                if let Some(core) = ended.upgrade() {
                    log::warn!("change feed ended: the cache reads the store from now on");
                    core.live.store(false, Ordering::Release);
                    core.write().clear();
                }
            },
        )?;
        Ok(StateCache {
            core,
            feed: Arc::new(Feed {
                _handler: handler,
                _listener: listener.clone(),
            }),
        })
    }

    /// The actor's state, or `None` when it does not exist. Loads it from
    /// the store the first time; afterwards returns the held value without a
    /// round trip.
    ///
    /// # Errors
    ///
    /// The store's errors on a first load ([`Error::Decode`](crate::Error::Decode)
    /// when the stored state is not a `T`).
    pub fn get(&self, id: &str) -> Result<Option<Arc<T>>> {
        if let Some(Slot::Ready { value, .. }) = self.core.read().get(id) {
            return Ok(value.clone());
        }
        if !self.core.live.load(Ordering::Acquire) {
            return Ok(self.core.store.load::<T>(id)?.map(Arc::new));
        }
        let mut newest = None;
        for _ in 0..MAX_CHASES {
            let generation = self.core.generation.load(Ordering::Acquire);
            {
                let mut slots = self.core.write();
                match slots.get(id) {
                    Some(Slot::Ready { value, .. }) => return Ok(value.clone()),
                    Some(Slot::Loading { .. }) => {}
                    None => {
                        slots.insert(id.to_owned(), Slot::Loading { announced: 0 });
                    }
                }
            }
            let loaded = match self.core.store.load_versioned::<T>(id) {
                Ok(loaded) => loaded,
                Err(e) => {
                    let mut slots = self.core.write();
                    if matches!(slots.get(id), Some(Slot::Loading { .. })) {
                        slots.remove(id);
                    }
                    return Err(e);
                }
            };
            let (value, sequence) = match loaded {
                Some(v) => (Some(Arc::new(v.value)), v.sequence),
                None => (None, 0),
            };
            let mut slots = self.core.write();
            match slots.get(id) {
                Some(Slot::Ready {
                    value: held,
                    sequence: s,
                }) if *s >= sequence => return Ok(held.clone()),
                Some(Slot::Loading { announced })
                    if *announced > sequence
                        || self.core.generation.load(Ordering::Acquire) != generation =>
                {
                    newest = Some((value, sequence));
                    continue;
                }
                _ if !self.core.live.load(Ordering::Acquire) => {
                    slots.remove(id);
                    return Ok(value);
                }
                _ => {
                    slots.insert(
                        id.to_owned(),
                        Slot::Ready {
                            value: value.clone(),
                            sequence,
                        },
                    );
                    return Ok(value);
                }
            }
        }
        // The actor kept changing while it loaded: hold the newest version
        // read; the next announcement refreshes it.
        let (value, sequence) = newest.unwrap_or((None, 0));
        self.core.write().insert(
            id.to_owned(),
            Slot::Ready {
                value: value.clone(),
                sequence,
            },
        );
        Ok(value)
    }

    /// The sequence number of the held version, without a round trip
    /// (`None` when the actor is not held or does not exist).
    pub fn sequence(&self, id: &str) -> Option<u64> {
        match self.core.read().get(id) {
            Some(Slot::Ready {
                value: Some(_),
                sequence,
            }) => Some(*sequence),
            _ => None,
        }
    }

    /// Whether the cache holds the actor (present or known absent).
    pub fn contains(&self, id: &str) -> bool {
        matches!(self.core.read().get(id), Some(Slot::Ready { .. }))
    }

    /// Stops holding the actor; the next `get` loads it again.
    pub fn forget(&self, id: &str) {
        self.core.write().remove(id);
    }

    /// How many actors are held.
    pub fn len(&self) -> usize {
        self.core
            .read()
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count()
    }

    /// Whether no actor is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
