//! Decoding untrusted stored bytes: truncated input, deep nesting and
//! lengths far beyond the input give a decode error, with the memory a
//! decode allocates bounded by the input's size and its stack bounded by the
//! codec's nesting limit.
//!
//! Hand-made hostile inputs, then a deterministic fuzz loop (seeded
//! mutations of valid encodings) over [`Codec::decode`], the store's decode
//! path, and a few of the inputs through a real store. The loop runs a
//! bounded number of cases by default; for a longer run:
//!
//! ```sh
//! TREBUCHET_FUZZ_SECONDS=300 cargo test --release --features testing \
//!     --test bad_input_gets_a_clear_error decode_fuzz -- --nocapture
//! ```
//!
//! (`TREBUCHET_FUZZ_SEED` replays one seed; a failure prints its seed and input.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{Codec, Error};

// ----- an allocator that measures one decode's peak ----------------------------

/// Counts the bytes live on the current thread, and their peak, while a
/// measurement runs on it. Other threads are not counted.
struct Measuring;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let live = LIVE.with(|l| {
                l.set(l.get() + delta);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
        }
    });
}

unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() {
            track(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = System.realloc(ptr, layout, new_size);
        if !new.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Measuring = Measuring;

/// Runs `f` and returns its result with the peak of bytes it had allocated
/// at once on this thread.
fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    MEASURING.with(|m| m.set(true));
    let result = f();
    MEASURING.with(|m| m.set(false));
    (result, PEAK.with(|p| p.get()).max(0) as usize)
}

/// What one decode may allocate at most: serde's pre-allocation for a
/// collection whose length the input claims is capped at 1 MiB of elements
/// (a `HashMap` rounds that up to a power of two of buckets, plus control
/// bytes: under 3 MiB), plus a multiple of the input (a byte of CBOR can
/// become a `ciborium::Value` of tens of bytes, and collections double while
/// they grow). Never the length an input claims.
fn allocation_bound(input: usize) -> usize {
    (3 << 20) + 256 * input
}

// ----- the types decoded ---------------------------------------------------------

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Room {
    name: String,
    round: u32,
    scores: BTreeMap<String, i64>,
    players: Vec<Player>,
    blob: Vec<u8>,
    winner: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Player {
    id: u64,
    nick: String,
    ratio: f64,
}

/// A recursive type: each level of the input is a level of the stack.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
enum Tree {
    Leaf(i64),
    Node(Vec<Tree>),
}

fn room() -> Room {
    Room {
        name: "lobby \"A\"".into(),
        round: 7,
        scores: [("alice".into(), 10), ("bob".into(), -3)].into(),
        players: vec![
            Player {
                id: 1,
                nick: "al".into(),
                ratio: 0.5,
            },
            Player {
                id: u64::MAX,
                nick: "🦀".into(),
                ratio: -1e300,
            },
        ],
        blob: vec![0, 1, 2, 255],
        winner: None,
    }
}

fn tree(depth: usize) -> Tree {
    (0..depth).fold(Tree::Leaf(1), |t, _| Tree::Node(vec![t, Tree::Leaf(2)]))
}

/// Decodes `input` with `codec` into every type above, on a thread with
/// Rust's default 2 MiB stack, checking that none panics and none
/// allocates beyond [`allocation_bound`]. Returns how many decoded.
fn decode_all(codec: Codec, input: &[u8]) -> Result<usize, String> {
    let bound = allocation_bound(input.len());
    let mut decoded = 0;
    macro_rules! attempt {
        ($t:ty) => {{
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                peak_allocation(|| codec.decode::<$t>(input).is_ok())
            }));
            match outcome {
                Ok((ok, peak)) => {
                    if peak > bound {
                        return Err(format!(
                            "{} allocated {peak} bytes for {} input bytes (bound {bound})",
                            stringify!($t),
                            input.len()
                        ));
                    }
                    decoded += usize::from(ok);
                }
                Err(_) => return Err(format!("{} panicked", stringify!($t))),
            }
        }};
    }
    attempt!(Room);
    attempt!(Tree);
    attempt!(Vec<u64>);
    attempt!(Vec<Vec<u8>>);
    attempt!(String);
    attempt!(HashMap<String, Vec<String>>);
    attempt!(ciborium::Value);
    attempt!(serde_json::Value);
    attempt!(Option<(u8, i128, f32, bool, char)>);
    Ok(decoded)
}

/// Runs `decode_all` on a fresh thread with the default stack size (a stack
/// overflow aborts the process: the test then fails loudly).
fn decode_all_on_thread(codec: Codec, input: Vec<u8>) -> Result<usize, String> {
    thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || decode_all(codec, &input))
        .expect("spawn a decode thread")
        .join()
        .unwrap_or_else(|_| Err("the decode thread died".into()))
}

fn hex(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(64).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 64 {
        format!("{shown}… ({} bytes)", bytes.len())
    } else {
        shown
    }
}

// ----- hand-made hostile inputs ---------------------------------------------------

/// CBOR that is truncated, nested far beyond any real state, or claims
/// lengths far beyond the input. Each must fail to decode (or decode into
/// something small), never panic, overflow the stack or allocate the claim.
fn hostile_cbor() -> Vec<(&'static str, Vec<u8>)> {
    let valid = Codec::Cbor.encode(&room()).unwrap();
    let huge = |major: u8| {
        let mut v = vec![(major << 5) | 27];
        v.extend_from_slice(&u64::MAX.to_be_bytes());
        v
    };
    let claim = |major: u8, len: u64, body: &[u8]| {
        let mut v = vec![(major << 5) | 27];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(body);
        v
    };
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("a lone break", vec![0xff]),
        ("reserved additional info", vec![0x1c]),
        ("truncated to one byte", valid[..1].to_vec()),
        ("truncated by half", valid[..valid.len() / 2].to_vec()),
        ("truncated by one byte", valid[..valid.len() - 1].to_vec()),
        ("bytes claiming 2^64-1", huge(2)),
        ("text claiming 2^64-1", huge(3)),
        ("array claiming 2^64-1", huge(4)),
        ("map claiming 2^64-1", huge(5)),
        ("bytes claiming 2^40 with 3", claim(2, 1 << 40, b"abc")),
        ("text claiming 2^40 with 3", claim(3, 1 << 40, b"abc")),
        ("array claiming 2^40 with one", claim(4, 1 << 40, &[0x01])),
        (
            "map claiming 2^40 with one",
            claim(5, 1 << 40, &[0x61, b'a', 0x01]),
        ),
        ("array claiming 2^62 of zeros", claim(4, 1 << 62, &[0; 64])),
        ("bignum claiming 2^40", {
            let mut v = vec![0xc2];
            v.extend(claim(2, 1 << 40, &[1; 8]));
            v
        }),
        ("bignum of 17 bytes", {
            let mut v = vec![0xc2, 0x51];
            v.extend_from_slice(&[0xff; 17]);
            v
        }),
        ("100,000 nested arrays", vec![0x81; 100_000]),
        ("100,000 nested indefinite arrays", vec![0x9f; 100_000]),
        ("100,000 nested maps", [0xa1, 0x00].repeat(100_000)),
        ("100,000 nested tags", [0xc6].repeat(100_000)),
        ("300 nested arrays then an int", {
            let mut v = vec![0x81; 300];
            v.push(0x01);
            v
        }),
        ("250 nested arrays then an int", {
            let mut v = vec![0x81; 250];
            v.push(0x01);
            v
        }),
        ("100,000 empty segments of indefinite bytes", {
            let mut v = vec![0x5f];
            v.extend(std::iter::repeat_n(0x40, 100_000));
            v.push(0xff);
            v
        }),
        ("nested indefinite byte strings", {
            let mut v = vec![0x5f; 10_000];
            v.extend(std::iter::repeat_n(0xff, 10_000));
            v
        }),
        ("text that is not UTF-8", vec![0x62, 0xc3, 0x28]),
        ("a map of 50,000 duplicate keys", {
            let mut v = claim(5, 50_000, &[]);
            for _ in 0..50_000 {
                v.extend_from_slice(&[0x61, b'k', 0x01]);
            }
            v
        }),
        ("an array of 200,000 nulls", {
            let mut v = claim(4, 200_000, &[]);
            v.extend(std::iter::repeat_n(0xf6, 200_000));
            v
        }),
    ];
    // A valid deep tree, below and above the nesting limit.
    for depth in [60, 80, 300] {
        let label: &'static str = match depth {
            60 => "a tree 60 levels deep",
            80 => "a tree 80 levels deep",
            _ => "a tree 300 levels deep",
        };
        cases.push((label, Codec::Cbor.encode(&tree(depth)).unwrap()));
    }
    cases
}

fn hostile_json() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", b"".to_vec()),
        ("truncated", br#"{"name":"lob"#.to_vec()),
        ("100,000 open brackets", vec![b'['; 100_000]),
        ("100,000 nested objects", br#"{"a":"#.repeat(100_000)),
        ("a number of 100,000 digits", vec![b'9'; 100_000]),
        ("an unterminated string of 100,000 bytes", {
            let mut v = vec![b'"'];
            v.extend(std::iter::repeat_n(b'x', 100_000));
            v
        }),
        ("invalid UTF-8", b"\"\xc3\x28\"".to_vec()),
        ("a lone surrogate escape", br#""\ud800""#.to_vec()),
    ]
}

#[test]
fn hostile_stored_bytes_give_decode_errors_within_bounds() {
    let mut failures = Vec::new();
    for (codec, cases) in [(Codec::Cbor, hostile_cbor()), (Codec::Json, hostile_json())] {
        for (label, input) in cases {
            if let Err(why) = decode_all_on_thread(codec, input.clone()) {
                failures.push(format!("{codec:?} {label}: {why}; input {}", hex(&input)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // What a decode of these must say, for the ones that cannot be valid.
    for (label, input) in hostile_cbor() {
        if label.starts_with("a tree ") && !label.contains("300")
            || label.starts_with("250")
            || label.starts_with("an array of")
        {
            continue;
        }
        assert!(
            Codec::Cbor.decode::<Room>(&input).is_err(),
            "{label} decoded as a Room"
        );
    }
    // Nesting within the limit decodes; beyond it, an error rather than a
    // deeper stack.
    assert_eq!(
        Codec::Cbor
            .decode::<Tree>(&Codec::Cbor.encode(&tree(80)).unwrap())
            .unwrap(),
        tree(80)
    );
    let too_deep = Codec::Cbor.decode::<Tree>(&Codec::Cbor.encode(&tree(300)).unwrap());
    let err = too_deep.expect_err("a tree 300 levels deep is beyond the limit");
    assert!(
        err.to_string().to_lowercase().contains("recursion"),
        "{err}"
    );
}

// ----- the fuzz loop -----------------------------------------------------------------

/// Valid encodings to mutate.
fn seeds(codec: Codec) -> Vec<Vec<u8>> {
    let mut scores = BTreeMap::new();
    for i in 0..40 {
        scores.insert(format!("player-{i}"), i64::from(i) * 1_000_003);
    }
    vec![
        codec.encode(&room()).unwrap(),
        codec.encode(&tree(6)).unwrap(),
        codec.encode(&scores).unwrap(),
        codec.encode(&vec![u64::MAX, 0, 1 << 40]).unwrap(),
        codec.encode(&"a string with \"quotes\" and 🦀").unwrap(),
        codec
            .encode(&serde_json::json!({"a": [1, 2.5, null, true, {"b": "c"}], "d": -7}))
            .unwrap(),
    ]
}

/// One random mutation of `input`.
fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>, codec: Codec) {
    let len = input.len();
    match rng.u8(..10) {
        // Flip some bits.
        0 => {
            for _ in 0..rng.usize(1..4) {
                if len > 0 {
                    let i = rng.usize(..len);
                    input[i] ^= 1 << rng.u8(..8);
                }
            }
        }
        // Replace a byte with anything.
        1 if len > 0 => {
            let i = rng.usize(..len);
            input[i] = rng.u8(..);
        }
        // Truncate.
        2 if len > 0 => input.truncate(rng.usize(..len)),
        // Insert random bytes.
        3 => {
            let at = rng.usize(..=len);
            let n = rng.usize(1..9);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            input.splice(at..at, bytes);
        }
        // Duplicate a slice (repeats headers and nesting).
        4 if len > 1 => {
            let start = rng.usize(..len - 1);
            let end = rng.usize(start + 1..=len.min(start + 64));
            let slice = input[start..end].to_vec();
            let at = rng.usize(..=input.len());
            for _ in 0..rng.usize(1..50) {
                input.splice(at..at, slice.iter().copied());
            }
        }
        // A header claiming a huge length, CBOR only.
        5 if codec == Codec::Cbor => {
            let at = rng.usize(..=len);
            let major = rng.u8(..8);
            // Additional information 26: a 4-byte length; 27: 8 bytes.
            let info = 26 + rng.u8(..2);
            let mut header = vec![(major << 5) | info];
            header.extend(std::iter::repeat_n(0xff, if info == 26 { 4 } else { 8 }));
            input.splice(at..at, header);
        }
        // Deep nesting.
        6 => {
            let at = rng.usize(..=len);
            let opener: &[u8] = match codec {
                Codec::Cbor => [&[0x81][..], &[0x9f], &[0xa1, 0x00], &[0xc6]][rng.usize(..4)],
                _ => [&b"["[..], b"{\"k\":"][rng.usize(..2)],
            };
            let n = rng.usize(100..2_000);
            input.splice(at..at, opener.repeat(n));
        }
        // Splice two inputs together.
        7 => {
            let other = &seeds(codec)[rng.usize(..6)];
            let cut = rng.usize(..=other.len());
            input.extend_from_slice(&other[cut..]);
        }
        // Swap two bytes.
        _ if len > 1 => {
            let (a, b) = (rng.usize(..len), rng.usize(..len));
            input.swap(a, b);
        }
        _ => input.push(rng.u8(..)),
    }
}

/// Mutates the seeds with a seeded generator and decodes every result.
/// Bounded: 2,000 cases per codec by default, or `TREBUCHET_FUZZ_SECONDS`.
#[test]
fn fuzzed_stored_bytes_never_panic_overflow_or_balloon() {
    let seed: u64 = std::env::var("TREBUCHET_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7472_6562);
    let budget = std::env::var("TREBUCHET_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    const DEFAULT_CASES: u64 = 2_000;
    let handle = thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let started = Instant::now();
            let mut cases = 0u64;
            let mut decoded = 0usize;
            'outer: for round in 0u64.. {
                for codec in [Codec::Cbor, Codec::Json] {
                    let case_seed =
                        seed.wrapping_add(round.wrapping_mul(2) + u64::from(codec == Codec::Json));
                    let mut rng = fastrand::Rng::with_seed(case_seed);
                    let seeds = seeds(codec);
                    let mut input = seeds[rng.usize(..seeds.len())].clone();
                    for _ in 0..rng.usize(1..6) {
                        mutate(&mut rng, &mut input, codec);
                    }
                    match decode_all(codec, &input) {
                        Ok(n) => decoded += n,
                        Err(why) => {
                            return Err(format!(
                                "{codec:?} case seed {case_seed}: {why}; input {}",
                                hex(&input)
                            ))
                        }
                    }
                    cases += 1;
                }
                let done = match budget {
                    Some(budget) => started.elapsed() >= budget,
                    None => cases >= 2 * DEFAULT_CASES,
                };
                if done {
                    break 'outer;
                }
            }
            Ok((cases, decoded, started.elapsed()))
        })
        .unwrap();
    match handle.join() {
        Ok(Ok((cases, decoded, took))) => {
            eprintln!(
                "fuzzed {cases} inputs in {took:?} (seed {seed}); {decoded} decodes succeeded"
            );
            // The mutations are not all fatal: the loop exercised both paths.
            assert!(decoded > 0);
        }
        Ok(Err(why)) => panic!("{why}"),
        Err(_) => panic!("the fuzz thread died"),
    }
}

// ----- through a real store ----------------------------------------------------------

/// Hostile bytes stored with `save_bytes` (as another writer could store
/// them) give `Error::Decode` naming the actor from `load`, and the bytes
/// stay as they were.
#[test]
fn hostile_bytes_in_the_table_give_decode_errors() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    for (label, input) in hostile_cbor() {
        if label.starts_with("a tree ") && !label.contains("300")
            || label.starts_with("250")
            || label.starts_with("an array of")
        {
            continue;
        }
        let id = format!("hostile {label}");
        store.raw().save(&id, &input).unwrap();
        match store.load::<Room>(&id) {
            Err(Error::Decode { actor_id, .. }) => assert_eq!(actor_id, id),
            other => panic!("{label}: expected Error::Decode, got {other:?}"),
        }
        assert_eq!(store.raw().load(&id).unwrap(), Some(input), "{label}");
    }
}
