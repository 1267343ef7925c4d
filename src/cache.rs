//! A local map of decoded states kept fresh by the change feed: the seed's
//! "reload the actor when it changes", done once for everyone.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::SystemTime;

use serde::de::DeserializeOwned;

use crate::change::{ChangeKind, Event};
use crate::error::Result;
use crate::listener::{CallbackHandle, ChangeListener};
use crate::store::{to_u64, StateStore};

/// How often one `get` chases an actor that keeps changing while it loads
/// before it settles for the newest version it read.
const MAX_CHASES: usize = 8;

enum Slot<T> {
    /// Loaded: the state (`None` when the actor does not exist), the
    /// sequence number it was read at, and when it expires (by the
    /// server's clock, read against this machine's).
    Ready {
        value: Option<Arc<T>>,
        sequence: u64,
        expires: Option<SystemTime>,
    },
    /// A `get` is loading it; `announced` is the highest sequence number
    /// announced meanwhile, and `announces` counts the announces without a
    /// write ([`ChangeKind::Announced`]), which ask for a read again whatever
    /// their number.
    Loading { announced: u64, announces: u64 },
}

/// One actor as the cache reads it: the state, its sequence number and
/// when it expires; `None` when it does not exist.
type Loaded<T> = Option<(Arc<T>, u64, Option<SystemTime>)>;

/// One actor as read, before decoding: its bytes, sequence number and
/// expiry.
type Raw = (Vec<u8>, u64, Option<SystemTime>);

impl<T> Slot<T> {
    /// A slot of what was read.
    fn ready(loaded: Loaded<T>) -> Self {
        match loaded {
            Some((value, sequence, expires)) => Slot::Ready {
                value: Some(value),
                sequence,
                expires,
            },
            None => Slot::absent(0),
        }
    }

    /// A slot for an actor a `get` starts loading.
    fn loading() -> Self {
        Slot::Loading {
            announced: 0,
            announces: 0,
        }
    }

    /// A slot for an actor known not to exist (at `sequence`).
    fn absent(sequence: u64) -> Self {
        Slot::Ready {
            value: None,
            sequence,
            expires: None,
        }
    }

    /// The held value while it has not expired; `None` when it is not
    /// held, is being loaded, or has expired (then the store decides).
    fn fresh(&self) -> Option<&Option<Arc<T>>> {
        match self {
            Slot::Ready { value, expires, .. }
                if expires.is_none_or(|at| SystemTime::now() < at) =>
            {
                Some(value)
            }
            _ => None,
        }
    }
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

    /// Reads `ids` in one query, with their expiry, undecoded. Actors that
    /// do not exist are absent from the map.
    fn read_actors(&self, ids: &[&str]) -> Result<HashMap<String, Raw>> {
        let rows = self.store.call(true, |core, c| {
            Ok(c.prepare(&core.sql().load_cached)?
                .query(&mut c.client, &[&ids])?)
        })?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), (row.get(1), to_u64(row.get(2)), row.get(3))))
            .collect())
    }

    /// Decodes what [`read_actors`](Self::read_actors) read of actor `id`.
    fn decode(&self, id: &str, raw: Option<Raw>) -> Result<Loaded<T>> {
        raw.map(|(bytes, sequence, expires)| {
            let value = self.store.decode::<T>(id, &bytes)?;
            Ok((Arc::new(value), sequence, expires))
        })
        .transpose()
    }

    /// Reads and decodes one actor.
    fn read_one(&self, id: &str) -> Result<Loaded<T>> {
        let raw = self.read_actors(&[id])?.remove(id);
        self.decode(id, raw)
    }

    fn apply(&self, event: Event) {
        match event {
            Event::Change(change) => {
                // An announce is no new version: the actor is read again
                // whatever number it carries.
                let announce = change.kind == ChangeKind::Announced;
                {
                    let mut slots = self.write();
                    match slots.get_mut(&change.actor_id) {
                        None => return,
                        Some(Slot::Loading { announces, .. }) if announce => {
                            *announces += 1;
                            return;
                        }
                        Some(Slot::Loading { announced, .. }) => {
                            *announced = (*announced).max(change.sequence);
                            return;
                        }
                        Some(Slot::Ready { sequence, .. })
                            if !announce && *sequence >= change.sequence =>
                        {
                            return
                        }
                        Some(_) => {}
                    }
                }
                // Deletes too are read back rather than believed: any role
                // that may connect may NOTIFY the channel, and a forged
                // delete with a huge sequence number would otherwise empty
                // the slot and hide every later change.
                self.reload(&change.actor_id, announce);
            }
            Event::Resync(_) => self.reload_all(),
        }
    }

    /// Reads one actor again after it was announced: keeps what it read when
    /// it is newer than what is held, or, after an announce without a
    /// write, not older.
    fn reload(&self, id: &str, announce: bool) {
        match self.read_one(id) {
            Ok(loaded) => {
                let sequence = loaded.as_ref().map_or(0, |(_, s, _)| *s);
                let mut slots = self.write();
                if let Some(slot @ Slot::Ready { .. }) = slots.get_mut(id) {
                    if matches!(slot, Slot::Ready { sequence: s, .. }
                        if *s < sequence || (announce && *s == sequence) || loaded.is_none())
                    {
                        *slot = Slot::ready(loaded);
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
        let wanted: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut loaded = match self.read_actors(&wanted) {
            Ok(loaded) => loaded,
            Err(e) => {
                log::warn!("cache could not reload after a gap, emptying it: {e}");
                self.write()
                    .retain(|_, slot| matches!(slot, Slot::Loading { .. }));
                return;
            }
        };
        let mut slots = self.write();
        for id in ids {
            let Some(slot @ Slot::Ready { .. }) = slots.get_mut(&id) else {
                continue;
            };
            let Slot::Ready { sequence, .. } = slot else {
                continue;
            };
            match loaded.remove(&id) {
                None => *slot = Slot::absent(*sequence),
                Some(raw) if raw.1 >= *sequence => match self.decode(&id, Some(raw)) {
                    Ok(read) => *slot = Slot::ready(read),
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
/// read again in one query after any `Resync`. A state saved with a time to
/// live is served until it expires, by this machine's clock against the
/// expiry the server stored; after that `get` asks the store again (an
/// expiry is not announced until a sweep deletes the actor).
///
/// [`get`](Self::get) reads the network only for an actor the cache does not
/// hold yet; after that, reads are a map lookup under a read lock. Updates
/// are applied on the listener subscription's own thread, never on the
/// caller's.
///
/// Cheap to clone; the updating thread stops when the last clone is dropped.
/// The cache keeps its listener running (through its subscription); if the
/// listener is shut down explicitly, the cache empties itself and every `get`
/// reads the store.
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

/// Keeps the updating thread running for as long as a cache exists; its
/// subscription keeps the listener running.
struct Feed {
    _handler: CallbackHandle,
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
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// use trebuchet_postgres::StateCache;
    /// let rooms: StateCache<Vec<String>> = StateCache::new(&store, &listener)?;
    /// let players = rooms.get("room-1")?; // loads once, then kept fresh by the listener
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
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
            feed: Arc::new(Feed { _handler: handler }),
        })
    }

    /// The actor's state, or `None` when it does not exist. Loads it from
    /// the store the first time; afterwards returns the held value without a
    /// round trip.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// # let rooms: trebuchet_postgres::StateCache<Vec<String>> = trebuchet_postgres::StateCache::new(&store, &listener)?;
    /// if let Some(players) = rooms.get("room-1")? {
    ///     println!("{} players", players.len()); // an Arc<Vec<String>>, no copy
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The store's errors on a first load ([`Error::Decode`](crate::Error::Decode)
    /// when the stored state is not a `T`).
    pub fn get(&self, id: &str) -> Result<Option<Arc<T>>> {
        if let Some(value) = self.core.read().get(id).and_then(Slot::fresh) {
            return Ok(value.clone());
        }
        if !self.core.live.load(Ordering::Acquire) {
            return Ok(self.core.store.load::<T>(id)?.map(Arc::new));
        }
        let mut newest = None;
        for _ in 0..MAX_CHASES {
            let generation = self.core.generation.load(Ordering::Acquire);
            // The announces without a write so far: one that comes while
            // this load reads may not be in what it reads.
            let announces_before = {
                let mut slots = self.core.write();
                match slots.get(id) {
                    Some(slot @ Slot::Ready { .. }) => {
                        if let Some(value) = slot.fresh() {
                            return Ok(value.clone());
                        }
                        // Expired by this machine's clock: the store says
                        // whether it still exists.
                        slots.insert(id.to_owned(), Slot::loading());
                        0
                    }
                    Some(Slot::Loading { announces, .. }) => *announces,
                    None => {
                        slots.insert(id.to_owned(), Slot::loading());
                        0
                    }
                }
            };
            let loaded = match self.core.read_one(id) {
                Ok(loaded) => loaded,
                Err(e) => {
                    let mut slots = self.core.write();
                    if matches!(slots.get(id), Some(Slot::Loading { .. })) {
                        slots.remove(id);
                    }
                    return Err(e);
                }
            };
            let sequence = loaded.as_ref().map_or(0, |(_, s, _)| *s);
            let value = loaded.as_ref().map(|(v, _, _)| Arc::clone(v));
            let mut slots = self.core.write();
            match slots.get(id) {
                Some(held @ Slot::Ready { sequence: s, .. })
                    if *s >= sequence && held.fresh().is_some() =>
                {
                    return Ok(held.fresh().cloned().flatten());
                }
                Some(Slot::Loading {
                    announced,
                    announces,
                }) if *announced > sequence
                    || *announces != announces_before
                    || self.core.generation.load(Ordering::Acquire) != generation =>
                {
                    newest = Some(loaded);
                    continue;
                }
                _ if !self.core.live.load(Ordering::Acquire) => {
                    slots.remove(id);
                    return Ok(value);
                }
                _ => {
                    slots.insert(id.to_owned(), Slot::ready(loaded));
                    return Ok(value);
                }
            }
        }
        // The actor kept changing while it loaded: hold the newest version
        // read; the next announcement refreshes it.
        let loaded = newest.flatten();
        let value = loaded.as_ref().map(|(v, _, _)| Arc::clone(v));
        self.core.write().insert(id.to_owned(), Slot::ready(loaded));
        Ok(value)
    }

    /// The sequence number of the held version, without a round trip
    /// (`None` when the actor is not held, does not exist, or has expired
    /// by this machine's clock).
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// # let rooms: trebuchet_postgres::StateCache<u32> = trebuchet_postgres::StateCache::new(&store, &listener)?;
    /// rooms.get("room-1")?;
    /// println!("held at {:?}", rooms.sequence("room-1"));
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn sequence(&self, id: &str) -> Option<u64> {
        match self.core.read().get(id) {
            Some(
                slot @ Slot::Ready {
                    value: Some(_),
                    sequence,
                    ..
                },
            ) if slot.fresh().is_some() => Some(*sequence),
            _ => None,
        }
    }

    /// Whether the cache holds the actor (present or known absent).
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// # let rooms: trebuchet_postgres::StateCache<u32> = trebuchet_postgres::StateCache::new(&store, &listener)?;
    /// if !rooms.contains("room-1") {
    ///     rooms.get("room-1")?; // the first get loads it
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn contains(&self, id: &str) -> bool {
        matches!(self.core.read().get(id), Some(Slot::Ready { .. }))
    }

    /// Stops holding the actor; the next `get` loads it again.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// # let rooms: trebuchet_postgres::StateCache<u32> = trebuchet_postgres::StateCache::new(&store, &listener)?;
    /// rooms.forget("room-1"); // the next get asks the store again
    /// assert!(!rooms.contains("room-1"));
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn forget(&self, id: &str) {
        self.core.write().remove(id);
    }

    /// How many actors are held.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// # let rooms: trebuchet_postgres::StateCache<u32> = trebuchet_postgres::StateCache::new(&store, &listener)?;
    /// rooms.get("room-1")?;
    /// println!("{} actors held", rooms.len());
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.core
            .read()
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count()
    }

    /// Whether no actor is held.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// # let listener = store.listener()?;
    /// # let rooms: trebuchet_postgres::StateCache<u32> = trebuchet_postgres::StateCache::new(&store, &listener)?;
    /// assert!(rooms.is_empty()); // nothing is held until asked for
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
