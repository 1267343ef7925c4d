//! The C ABI's store options, general write, conditional bulk saves,
//! batches and versioned loads (feature `ffi`), called from Rust as C
//! calls them, against a real PostgreSQL.
#![allow(unsafe_code)] // calls the C ABI as C would

mod common;

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use trebuchet_postgres::ffi::*;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};

use trebuchet_status::*;

fn last_error() -> String {
    // SAFETY: never NULL, valid until the next call on this thread.
    unsafe { CStr::from_ptr(trebuchet_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The actual sequence number of the calling thread's last conflict.
fn last_conflict_actual() -> Option<u64> {
    let mut actual = u64::MAX;
    // SAFETY: a writable u64.
    unsafe { trebuchet_last_conflict_actual(&mut actual) }.then_some(actual)
}

/// Asserts a status, with the last error in the message.
#[track_caller]
fn ok(status: trebuchet_status) {
    assert_eq!(status, TREBUCHET_OK, "{}", last_error());
}

/// Asserts a failed call's status and that its message names `what`.
#[track_caller]
fn fails(status: trebuchet_status, expected: trebuchet_status, what: &str) {
    assert_eq!(status, expected, "{}", last_error());
    assert!(
        last_error().contains(what),
        "the message should name {what:?}: {}",
        last_error()
    );
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Store options for the test server, `schema.table` and the schema's
/// channel.
fn options_for(schema: &TestSchema, table: &str) -> *mut trebuchet_store_options {
    let mut options = null_mut();
    let url = c(TestDatabase::shared().url());
    let table = c(&schema.table(table));
    let channel = c(&schema.channel());
    // SAFETY: valid strings and out-pointers.
    unsafe {
        ok(trebuchet_store_options_new(&mut options));
        ok(trebuchet_store_options_url(options, url.as_ptr()));
        ok(trebuchet_store_options_table(options, table.as_ptr()));
        ok(trebuchet_store_options_channel(options, channel.as_ptr()));
    }
    options
}

/// A store on a fresh, migrated `schema.actor_states`.
fn open_store(schema: &TestSchema) -> *mut trebuchet_store {
    let mut options = options_for(schema, "actor_states");
    let mut store = null_mut();
    // SAFETY: a live options handle and a writable out-pointer.
    unsafe {
        ok(trebuchet_store_options_migrate(options, true));
        ok(trebuchet_store_open_with(options, &mut store));
        trebuchet_store_options_free(&mut options);
    }
    store
}

/// Microseconds since the Unix epoch, now.
fn now_us() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(now.as_micros()).unwrap()
}

/// Asserts that `us` (microseconds since the epoch) is within the tests'
/// clock tolerance of `expected_us`.
#[track_caller]
fn assert_near(what: &str, us: i64, expected_us: i64) {
    let tolerance = i64::try_from(common::CLOCK_TOLERANCE.as_micros()).unwrap();
    assert!(
        (us - expected_us).abs() <= tolerance,
        "{what} is {us}, expected about {expected_us} ({} s off)",
        (us - expected_us) / 1_000_000
    );
}

/// The bytes of a buffer.
///
/// # Safety
///
/// `buffer` is a live buffer handle.
unsafe fn bytes_of(buffer: *const trebuchet_buffer) -> Vec<u8> {
    let (mut data, mut len) = (null(), 0);
    // SAFETY: forwarded; the bytes are copied before the buffer can go.
    unsafe {
        ok(trebuchet_buffer_get(buffer, &mut data, &mut len));
        std::slice::from_raw_parts(data, len).to_vec()
    }
}

#[test]
fn a_store_opened_with_options_uses_its_table_channel_and_pool() {
    let schema = TestDatabase::shared().schema();
    let mut options = options_for(&schema, "rooms");
    let mut store = null_mut();
    // SAFETY: live handles, valid strings and out-pointers.
    unsafe {
        ok(trebuchet_store_options_pool_size(options, 3));
        ok(trebuchet_store_options_connect_timeout_ms(options, 5_000));
        ok(trebuchet_store_options_pool_timeout_ms(options, 5_000));
        ok(trebuchet_store_options_statement_timeout_ms(
            options, 30_000,
        ));
        ok(trebuchet_store_options_call_timeout_ms(options, 0));
        ok(trebuchet_store_options_wait_for_server_ms(options, 1_000));
        ok(trebuchet_store_options_group_commit(options, false));
        ok(trebuchet_store_options_outcome_timeout_ms(options, 2_000));
        ok(trebuchet_store_options_migrate(options, true));
        ok(trebuchet_store_open_with(options, &mut store));
        // The options are read, not kept.
        trebuchet_store_options_free(&mut options);
        assert!(options.is_null());

        // Migrated on open, in the table named.
        ok(trebuchet_store_verify(store));
        let mut pool = std::mem::MaybeUninit::<trebuchet_pool_state>::uninit();
        ok(trebuchet_store_pool_state(store, pool.as_mut_ptr()));
        let pool = pool.assume_init();
        assert_eq!(pool.max_size, 3);
        assert!(pool.connections >= 1 && pool.connections <= 3, "{pool:?}");

        let mut listener = null_mut();
        let mut subscription = null_mut();
        ok(trebuchet_listener_open(store, &mut listener));
        ok(trebuchet_listener_subscribe(
            listener,
            c"room-1".as_ptr(),
            &mut subscription,
        ));
        let mut sequence = 0;
        ok(trebuchet_store_save(
            store,
            c"room-1".as_ptr(),
            b"hi".as_ptr(),
            2,
            &mut sequence,
        ));
        assert_eq!(sequence, 1);
        let mut client = schema.client().unwrap();
        let row = client
            .query_one(
                &format!(
                    "SELECT state, sequence_number FROM {}.rooms WHERE actor_id = 'room-1'",
                    schema.name()
                ),
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, Vec<u8>>(0), b"hi");
        assert_eq!(row.get::<_, i64>(1), 1);
        // Announced on the channel named.
        let mut event = std::mem::MaybeUninit::<trebuchet_event>::uninit();
        ok(trebuchet_subscription_next(
            subscription,
            30_000,
            event.as_mut_ptr(),
        ));
        let event = event.assume_init();
        assert_eq!(event.kind, trebuchet_event_kind::TREBUCHET_EVENT_SAVED);
        assert_eq!(event.sequence, 1);
        trebuchet_subscription_free(&mut subscription);
        trebuchet_listener_free(&mut listener);
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn an_announce_reaches_subscribers_as_its_own_kind_with_the_current_number() {
    let schema = TestDatabase::shared().schema();
    let mut options = options_for(&schema, "rooms");
    let mut store = null_mut();
    // SAFETY: valid handles, strings and out-pointers throughout.
    unsafe {
        ok(trebuchet_store_options_migrate(options, true));
        ok(trebuchet_store_open_with(options, &mut store));
        trebuchet_store_options_free(&mut options);
        let mut sequence = 0;
        for _ in 0..2 {
            ok(trebuchet_store_save(
                store,
                c"room-1".as_ptr(),
                b"hi".as_ptr(),
                2,
                &mut sequence,
            ));
        }
        assert_eq!(sequence, 2);
        let mut listener = null_mut();
        let mut subscription = null_mut();
        ok(trebuchet_listener_open(store, &mut listener));
        ok(trebuchet_listener_subscribe(
            listener,
            null(),
            &mut subscription,
        ));

        // Bad ids are refused and nothing is sent.
        fails(
            trebuchet_listener_announce(listener, null()),
            TREBUCHET_NULL_ARGUMENT,
            "actor_id",
        );
        fails(
            trebuchet_listener_announce(listener, c"".as_ptr()),
            TREBUCHET_INVALID_ACTOR_ID,
            "empty",
        );
        ok(trebuchet_listener_announce(listener, c"room-1".as_ptr()));
        ok(trebuchet_listener_announce(listener, c"nobody".as_ptr()));

        let mut seen = Vec::new();
        for _ in 0..2 {
            let mut event = std::mem::MaybeUninit::<trebuchet_event>::uninit();
            ok(trebuchet_subscription_next(
                subscription,
                30_000,
                event.as_mut_ptr(),
            ));
            let event = event.assume_init();
            let id = CStr::from_ptr(event.actor_id.as_ptr())
                .to_str()
                .unwrap()
                .to_owned();
            seen.push((event.kind, id, event.sequence));
        }
        assert_eq!(
            seen,
            [
                (
                    trebuchet_event_kind::TREBUCHET_EVENT_ANNOUNCED,
                    "room-1".to_owned(),
                    2
                ),
                (
                    trebuchet_event_kind::TREBUCHET_EVENT_ANNOUNCED,
                    "nobody".to_owned(),
                    0
                ),
            ]
        );
        // An announce writes nothing.
        let mut client = schema.client().unwrap();
        let row = client
            .query_one(
                &format!("SELECT max(sequence_number) FROM {}.rooms", schema.name()),
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 2);
        trebuchet_subscription_free(&mut subscription);
        trebuchet_listener_free(&mut listener);
        trebuchet_store_free(&mut store);
    }
}

/// What the nested call in [`call_from_inside`] came back with.
struct Nested {
    store: *const trebuchet_store,
    status: Option<trebuchet_status>,
    waited: Duration,
}

/// A transform step that makes another call on the same store while the
/// transform holds its connection, then cancels.
unsafe extern "C" fn call_from_inside(
    user_data: *mut c_void,
    _current: *const u8,
    _len: usize,
    _exists: bool,
    _next: *mut trebuchet_output,
) -> i32 {
    // SAFETY: the test passes a `Nested` that outlives the transform.
    let nested = unsafe { &mut *user_data.cast::<Nested>() };
    let start = Instant::now();
    let mut exists = false;
    // SAFETY: a live store.
    let status = unsafe { trebuchet_store_exists(nested.store, c"other".as_ptr(), &mut exists) };
    nested.status = Some(status);
    nested.waited = start.elapsed();
    1
}

#[test]
fn a_pool_of_one_connection_makes_a_second_call_wait_for_the_pool_timeout() {
    let schema = TestDatabase::shared().schema();
    let mut options = options_for(&schema, "actor_states");
    let mut store = null_mut();
    // SAFETY: live handles, valid strings and out-pointers.
    unsafe {
        ok(trebuchet_store_options_pool_size(options, 1));
        ok(trebuchet_store_options_pool_timeout_ms(options, 300));
        ok(trebuchet_store_options_migrate(options, true));
        ok(trebuchet_store_open_with(options, &mut store));
        trebuchet_store_options_free(&mut options);
        let mut pool = std::mem::MaybeUninit::<trebuchet_pool_state>::uninit();
        ok(trebuchet_store_pool_state(store, pool.as_mut_ptr()));
        assert_eq!(pool.assume_init().max_size, 1);

        let mut nested = Nested {
            store,
            status: None,
            waited: Duration::ZERO,
        };
        let status = trebuchet_store_transform(
            store,
            c"room".as_ptr(),
            Some(call_from_inside),
            std::ptr::from_mut(&mut nested).cast(),
            null_mut(),
        );
        assert_eq!(status, TREBUCHET_CALLBACK_FAILED, "{}", last_error());
        assert_eq!(nested.status, Some(TREBUCHET_POOL_EXHAUSTED));
        assert!(
            nested.waited >= Duration::from_millis(250),
            "waited {:?}",
            nested.waited
        );
        let mut pool = std::mem::MaybeUninit::<trebuchet_pool_state>::uninit();
        ok(trebuchet_store_pool_state(store, pool.as_mut_ptr()));
        let pool = pool.assume_init();
        assert!(pool.timeouts >= 1, "{pool:?}");
        assert!(pool.waits >= 1 && pool.wait_time_us >= 250_000, "{pool:?}");
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn store_options_refuse_bad_arguments_and_leave_outputs_untouched() {
    let schema = TestDatabase::shared().schema();
    // SAFETY: NULLs, bad values and wrong handles are what is tested; the
    // rest is valid.
    unsafe {
        let status = trebuchet_store_options_new(null_mut());
        fails(status, TREBUCHET_NULL_ARGUMENT, "options_out");
        fails(
            trebuchet_store_options_pool_size(null_mut(), 3),
            TREBUCHET_NULL_ARGUMENT,
            "options",
        );
        fails(
            trebuchet_store_options_migrate(null_mut(), true),
            TREBUCHET_NULL_ARGUMENT,
            "options",
        );

        let mut options = options_for(&schema, "actor_states");
        fails(
            trebuchet_store_options_pool_size(options, 0),
            TREBUCHET_INVALID_ARGUMENT,
            "pool_size",
        );
        for setter in [
            trebuchet_store_options_connect_timeout_ms,
            trebuchet_store_options_pool_timeout_ms,
            trebuchet_store_options_outcome_timeout_ms,
        ] {
            fails(setter(options, 0), TREBUCHET_INVALID_ARGUMENT, "timeout_ms");
            fails(
                setter(options, u64::MAX),
                TREBUCHET_INVALID_ARGUMENT,
                "timeout_ms",
            );
        }
        fails(
            trebuchet_store_options_wait_for_server_ms(options, 0),
            TREBUCHET_INVALID_ARGUMENT,
            "wait_ms",
        );
        fails(
            trebuchet_store_options_statement_timeout_ms(options, 1 << 31),
            TREBUCHET_INVALID_ARGUMENT,
            "timeout_ms",
        );
        let bad_utf8 = b"room-\xff\0";
        fails(
            trebuchet_store_options_table(options, bad_utf8.as_ptr().cast::<c_char>()),
            TREBUCHET_INVALID_UTF8,
            "table",
        );

        // Refused settings changed nothing: the store opens as before.
        let mut store = null_mut();
        fails(
            trebuchet_store_open_with(options, null_mut()),
            TREBUCHET_NULL_ARGUMENT,
            "store_out",
        );
        ok(trebuchet_store_options_migrate(options, true));
        ok(trebuchet_store_open_with(options, &mut store));
        let mut pool = std::mem::MaybeUninit::<trebuchet_pool_state>::uninit();
        ok(trebuchet_store_pool_state(store, pool.as_mut_ptr()));
        assert_eq!(pool.assume_init().max_size, 10, "the default");
        fails(
            trebuchet_store_pool_state(store, null_mut()),
            TREBUCHET_NULL_ARGUMENT,
            "state_out",
        );

        // Checked when opening: the out-pointer is left alone.
        let mut untouched: *mut trebuchet_store = std::ptr::dangling_mut();
        ok(trebuchet_store_options_table(
            options,
            c"no such-table!".as_ptr(),
        ));
        fails(
            trebuchet_store_open_with(options, &mut untouched),
            TREBUCHET_INVALID_CONFIG,
            "no such-table!",
        );
        assert_eq!(untouched, std::ptr::dangling_mut());
        ok(trebuchet_store_options_table(options, null()));
        ok(trebuchet_store_options_url(
            options,
            c"postgresql://someone:pa55-w0rd-xyz@127.0.0.1:1/db".as_ptr(),
        ));
        ok(trebuchet_store_options_connect_timeout_ms(options, 2_000));
        fails(
            trebuchet_store_open_with(options, &mut untouched),
            TREBUCHET_CONNECT_FAILED,
            "127.0.0.1:1",
        );
        assert!(!last_error().contains("pa55-w0rd-xyz"), "{}", last_error());
        assert_eq!(untouched, std::ptr::dangling_mut());
        ok(trebuchet_store_options_url(
            options,
            c"postgresql://[bad".as_ptr(),
        ));
        fails(
            trebuchet_store_open_with(options, &mut untouched),
            TREBUCHET_INVALID_CONFIG,
            "connection string",
        );
        assert_eq!(untouched, std::ptr::dangling_mut());

        // Handles of another kind.
        fails(
            trebuchet_store_options_pool_size(store.cast(), 3),
            TREBUCHET_WRONG_HANDLE,
            "trebuchet_store_options",
        );
        fails(
            trebuchet_store_open_with(store.cast(), &mut untouched),
            TREBUCHET_WRONG_HANDLE,
            "trebuchet_store_options",
        );
        let mut wrong: *mut trebuchet_store_options = store.cast();
        trebuchet_store_options_free(&mut wrong); // not options: left alone
        assert_eq!(wrong, store.cast());

        trebuchet_store_options_free(&mut options);
        assert!(options.is_null());
        trebuchet_store_options_free(&mut options);
        trebuchet_store_options_free(null_mut());
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn save_with_writes_as_its_options_say() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: live handles, valid strings, data and out-pointers.
    unsafe {
        let mut create = null_mut();
        ok(trebuchet_write_options_new(&mut create));
        ok(trebuchet_write_options_expect_absent(create));
        let save = |options: *const trebuchet_write_options, sequence: &mut u64| {
            trebuchet_store_save_with(store, c"room".as_ptr(), b"x".as_ptr(), 1, options, sequence)
        };
        let mut sequence = 0;
        ok(save(create, &mut sequence));
        assert_eq!(sequence, 1);
        assert_eq!(save(create, &mut sequence), TREBUCHET_CONFLICT);
        assert_eq!(sequence, 1, "untouched on a conflict");
        assert_eq!(last_conflict_actual(), Some(1));

        // The same setter again replaces the condition; with a time to live.
        let mut update = null_mut();
        ok(trebuchet_write_options_new(&mut update));
        ok(trebuchet_write_options_expect_sequence(update, 7));
        ok(trebuchet_write_options_expect_sequence(update, 1));
        ok(trebuchet_write_options_ttl_ms(update, 60_000));
        ok(save(update, &mut sequence));
        assert_eq!(sequence, 2);
        assert_eq!(save(update, &mut sequence), TREBUCHET_CONFLICT);
        assert_eq!(last_conflict_actual(), Some(2));
        let mut buffer = null_mut();
        let mut version = trebuchet_version::default();
        ok(trebuchet_store_load_with_version(
            store,
            c"room".as_ptr(),
            &mut buffer,
            &mut version,
        ));
        assert_eq!(version.sequence, 2);
        assert_near(
            "expires_at_us",
            version.expires_at_us,
            now_us() + 60_000_000,
        );
        trebuchet_buffer_free(&mut buffer);

        // NULL options: a plain save, which keeps the actor for good.
        ok(save(null(), &mut sequence));
        assert_eq!(sequence, 3);
        ok(trebuchet_store_load_with_version(
            store,
            c"room".as_ptr(),
            &mut buffer,
            &mut version,
        ));
        assert_eq!(version.expires_at_us, 0);
        trebuchet_buffer_free(&mut buffer);

        // A sequence number of the caller's choosing; a stale one conflicts.
        let mut at = null_mut();
        ok(trebuchet_write_options_new(&mut at));
        ok(trebuchet_write_options_sequence(at, 10));
        ok(save(at, &mut sequence));
        assert_eq!(sequence, 10);
        ok(trebuchet_write_options_sequence(at, 5));
        assert_eq!(save(at, &mut sequence), TREBUCHET_CONFLICT);
        assert_eq!(last_conflict_actual(), Some(10));
        // ... and cannot be combined with a condition.
        ok(trebuchet_write_options_expect_sequence(at, 10));
        fails(
            save(at, &mut sequence),
            TREBUCHET_INVALID_ARGUMENT,
            "sequence",
        );
        assert_eq!(last_conflict_actual(), None);
        assert_eq!(sequence, 10);

        // Out of range: nothing is written.
        let mut bad = null_mut();
        ok(trebuchet_write_options_new(&mut bad));
        ok(trebuchet_write_options_ttl_ms(bad, 0));
        fails(save(bad, &mut sequence), TREBUCHET_INVALID_ARGUMENT, "ttl");
        trebuchet_write_options_free(&mut bad);
        ok(trebuchet_write_options_new(&mut bad));
        ok(trebuchet_write_options_expect_sequence(bad, u64::MAX));
        fails(
            save(bad, &mut sequence),
            TREBUCHET_INVALID_ARGUMENT,
            &u64::MAX.to_string(),
        );
        assert_eq!(sequence, 10);
        let mut current = 0;
        ok(trebuchet_store_sequence(
            store,
            c"room".as_ptr(),
            &mut current,
        ));
        assert_eq!(current, 10);

        // The short forms keep their behaviour on top of it.
        ok(trebuchet_store_save_if(
            store,
            c"room".as_ptr(),
            b"y".as_ptr(),
            1,
            10,
            &mut sequence,
        ));
        assert_eq!(sequence, 11);
        ok(trebuchet_store_save_with_ttl(
            store,
            c"room".as_ptr(),
            b"y".as_ptr(),
            1,
            60_000,
            &mut sequence,
        ));
        assert_eq!(sequence, 12);

        for options in [&mut create, &mut update, &mut at, &mut bad] {
            trebuchet_write_options_free(options);
            assert!(options.is_null());
            trebuchet_write_options_free(options);
        }
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn write_options_refuse_bad_arguments_and_leave_outputs_untouched() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: NULLs and wrong handles are what is tested; the rest is valid.
    unsafe {
        fails(
            trebuchet_write_options_new(null_mut()),
            TREBUCHET_NULL_ARGUMENT,
            "options_out",
        );
        for status in [
            trebuchet_write_options_expect_absent(null_mut()),
            trebuchet_write_options_expect_sequence(null_mut(), 1),
            trebuchet_write_options_ttl_ms(null_mut(), 1),
            trebuchet_write_options_sequence(null_mut(), 1),
        ] {
            assert_eq!(status, TREBUCHET_NULL_ARGUMENT);
        }
        fails(
            trebuchet_write_options_ttl_ms(null_mut(), 1),
            TREBUCHET_NULL_ARGUMENT,
            "options",
        );
        let mut options = null_mut();
        ok(trebuchet_write_options_new(&mut options));
        let mut sequence = 42;
        fails(
            trebuchet_store_save_with(null(), c"a".as_ptr(), null(), 0, options, &mut sequence),
            TREBUCHET_NULL_ARGUMENT,
            "store",
        );
        fails(
            trebuchet_store_save_with(store, null(), null(), 0, options, &mut sequence),
            TREBUCHET_NULL_ARGUMENT,
            "actor_id",
        );
        fails(
            trebuchet_store_save_with(store, c"a".as_ptr(), null(), 3, options, &mut sequence),
            TREBUCHET_NULL_ARGUMENT,
            "data",
        );
        fails(
            trebuchet_store_save_with(store, c"".as_ptr(), null(), 0, options, &mut sequence),
            TREBUCHET_INVALID_ACTOR_ID,
            "actor id is empty",
        );
        fails(
            trebuchet_store_save_with(store, c"a".as_ptr(), null(), 0, store.cast(), &mut sequence),
            TREBUCHET_WRONG_HANDLE,
            "trebuchet_write_options",
        );
        fails(
            trebuchet_write_options_ttl_ms(store.cast(), 1),
            TREBUCHET_WRONG_HANDLE,
            "trebuchet_write_options",
        );
        assert_eq!(sequence, 42);
        let mut exists = true;
        ok(trebuchet_store_exists(store, c"a".as_ptr(), &mut exists));
        assert!(!exists, "nothing was written");
        // sequence_out may be NULL.
        ok(trebuchet_store_save_with(
            store,
            c"a".as_ptr(),
            null(),
            0,
            options,
            null_mut(),
        ));
        trebuchet_write_options_free(&mut options);
        trebuchet_write_options_free(null_mut());
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn save_many_if_gives_each_item_its_result_and_a_conflict_its_actual_number() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    let ids = [c"p-1".as_ptr(), c"p-2".as_ptr(), c"p-3".as_ptr()];
    let data = [b"one".as_ptr(), null(), b"three".as_ptr()];
    let lens = [3usize, 0, 5];
    let unset = trebuchet_item_result {
        status: TREBUCHET_OTHER,
        sequence: 99,
        conflict_actual: 99,
    };
    // SAFETY: arrays of three elements, valid strings and bytes.
    unsafe {
        let mut results = [unset; 3];
        let expected = [TREBUCHET_EXPECT_ABSENT; 3];
        ok(trebuchet_store_save_many_if(
            store,
            3,
            ids.as_ptr(),
            data.as_ptr(),
            lens.as_ptr(),
            expected.as_ptr(),
            results.as_mut_ptr(),
        ));
        for result in results {
            assert_eq!(
                result,
                trebuchet_item_result {
                    status: TREBUCHET_OK,
                    sequence: 1,
                    conflict_actual: 0
                }
            );
        }
        // p-2 was saved again behind the caller's back.
        ok(trebuchet_store_save(
            store,
            c"p-2".as_ptr(),
            null(),
            0,
            null_mut(),
        ));
        let mut results = [unset; 3];
        ok(trebuchet_store_save_many_if(
            store,
            3,
            ids.as_ptr(),
            data.as_ptr(),
            lens.as_ptr(),
            [1, 1, 1].as_ptr(),
            results.as_mut_ptr(),
        ));
        assert_eq!(results[0].status, TREBUCHET_OK);
        assert_eq!(results[0].sequence, 2);
        assert_eq!(
            results[1],
            trebuchet_item_result {
                status: TREBUCHET_CONFLICT,
                sequence: 0,
                conflict_actual: 2
            },
            "the conflict's actual number, as data"
        );
        assert_eq!((results[2].status, results[2].sequence), (TREBUCHET_OK, 2));
        assert_eq!(
            last_conflict_actual(),
            None,
            "the call succeeded; the item carries it"
        );
        assert_eq!(last_error(), "");
        // A missing actor expected at a version: found 0.
        let mut result = [unset];
        ok(trebuchet_store_save_many_if(
            store,
            1,
            [c"nobody".as_ptr()].as_ptr(),
            [b"x".as_ptr()].as_ptr(),
            [1usize].as_ptr(),
            [4u64].as_ptr(),
            result.as_mut_ptr(),
        ));
        assert_eq!(result[0].status, TREBUCHET_CONFLICT);
        assert_eq!(result[0].conflict_actual, TREBUCHET_EXPECT_ABSENT);

        // Bad input: a typed status, nothing written, results untouched.
        let mut results = [unset; 2];
        let twice = [c"p-1".as_ptr(), c"p-1".as_ptr()];
        fails(
            trebuchet_store_save_many_if(
                store,
                2,
                twice.as_ptr(),
                data.as_ptr(),
                lens.as_ptr(),
                [2u64, 2].as_ptr(),
                results.as_mut_ptr(),
            ),
            TREBUCHET_INVALID_ARGUMENT,
            "p-1",
        );
        fails(
            trebuchet_store_save_many_if(
                store,
                2,
                ids.as_ptr(),
                data.as_ptr(),
                lens.as_ptr(),
                [2u64, u64::MAX].as_ptr(),
                results.as_mut_ptr(),
            ),
            TREBUCHET_INVALID_ARGUMENT,
            &u64::MAX.to_string(),
        );
        fails(
            trebuchet_store_save_many_if(
                store,
                2,
                ids.as_ptr(),
                data.as_ptr(),
                lens.as_ptr(),
                null(),
                results.as_mut_ptr(),
            ),
            TREBUCHET_NULL_ARGUMENT,
            "expected_sequences",
        );
        fails(
            trebuchet_store_save_many_if(
                store,
                2,
                ids.as_ptr(),
                data.as_ptr(),
                lens.as_ptr(),
                [2u64, 2].as_ptr(),
                null_mut(),
            ),
            TREBUCHET_NULL_ARGUMENT,
            "results_out",
        );
        fails(
            trebuchet_store_save_many_if(
                store,
                2,
                [c"p-1".as_ptr(), null()].as_ptr(),
                data.as_ptr(),
                lens.as_ptr(),
                [2u64, 2].as_ptr(),
                results.as_mut_ptr(),
            ),
            TREBUCHET_NULL_ARGUMENT,
            "actor_ids[1]",
        );
        fails(
            trebuchet_store_save_many_if(
                null(),
                2,
                ids.as_ptr(),
                data.as_ptr(),
                lens.as_ptr(),
                [2u64, 2].as_ptr(),
                results.as_mut_ptr(),
            ),
            TREBUCHET_NULL_ARGUMENT,
            "store",
        );
        assert_eq!(results, [unset; 2]);
        let mut sequence = 0;
        ok(trebuchet_store_sequence(
            store,
            c"p-1".as_ptr(),
            &mut sequence,
        ));
        assert_eq!(sequence, 2, "nothing was written");
        // Nothing to do, with NULL arrays.
        ok(trebuchet_store_save_many_if(
            store,
            0,
            null(),
            null(),
            null(),
            null(),
            null_mut(),
        ));
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn versioned_loads_give_the_sequence_and_timestamps_near_now() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: live handles, valid strings, arrays and out-pointers.
    unsafe {
        let before = now_us();
        ok(trebuchet_store_save(
            store,
            c"kept".as_ptr(),
            b"k".as_ptr(),
            1,
            null_mut(),
        ));
        ok(trebuchet_store_save(
            store,
            c"kept".as_ptr(),
            b"kk".as_ptr(),
            2,
            null_mut(),
        ));
        ok(trebuchet_store_save_with_ttl(
            store,
            c"session".as_ptr(),
            b"s".as_ptr(),
            1,
            3_600_000,
            null_mut(),
        ));

        let mut buffer = null_mut();
        let mut version = trebuchet_version::default();
        ok(trebuchet_store_load_with_version(
            store,
            c"kept".as_ptr(),
            &mut buffer,
            &mut version,
        ));
        assert_eq!(bytes_of(buffer), b"kk");
        trebuchet_buffer_free(&mut buffer);
        assert_eq!(version.sequence, 2);
        assert_near("updated_at_us", version.updated_at_us, before);
        assert_near("created_at_us", version.created_at_us, before);
        assert!(
            version.created_at_us <= version.updated_at_us,
            "{version:?}"
        );
        assert_eq!(version.expires_at_us, 0, "kept for good");

        // Not found: outputs untouched.
        let marker = trebuchet_version {
            sequence: 7,
            ..trebuchet_version::default()
        };
        let mut version = marker;
        let status =
            trebuchet_store_load_with_version(store, c"nobody".as_ptr(), &mut buffer, &mut version);
        assert_eq!(status, TREBUCHET_NOT_FOUND);
        assert!(buffer.is_null());
        assert_eq!(version, marker);
        fails(
            trebuchet_store_load_with_version(store, c"kept".as_ptr(), &mut buffer, null_mut()),
            TREBUCHET_NULL_ARGUMENT,
            "version_out",
        );
        fails(
            trebuchet_store_load_with_version(store, c"kept".as_ptr(), null_mut(), &mut version),
            TREBUCHET_NULL_ARGUMENT,
            "buffer_out",
        );
        fails(
            trebuchet_store_load_with_version(null(), c"kept".as_ptr(), &mut buffer, &mut version),
            TREBUCHET_NULL_ARGUMENT,
            "store",
        );
        assert_eq!(version, marker);

        // Several at once, in the order asked.
        let asked = [c"session".as_ptr(), c"nobody".as_ptr(), c"kept".as_ptr()];
        let mut buffers = [std::ptr::dangling_mut(); 3];
        let mut versions = [marker; 3];
        ok(trebuchet_store_load_many_versioned(
            store,
            3,
            asked.as_ptr(),
            buffers.as_mut_ptr(),
            versions.as_mut_ptr(),
        ));
        assert_eq!(bytes_of(buffers[0]), b"s");
        assert!(buffers[1].is_null());
        assert_eq!(bytes_of(buffers[2]), b"kk");
        assert_eq!(versions[0].sequence, 1);
        assert_near(
            "expires_at_us",
            versions[0].expires_at_us,
            before + 3_600_000_000,
        );
        assert_near("updated_at_us", versions[0].updated_at_us, before);
        assert_eq!(
            versions[1],
            trebuchet_version::default(),
            "all zero when absent"
        );
        assert_eq!(versions[2].sequence, 2);
        assert_eq!(versions[2].expires_at_us, 0);
        for buffer in &mut buffers {
            trebuchet_buffer_free(buffer);
        }
        // Versions only.
        let mut versions = [marker; 3];
        ok(trebuchet_store_load_many_versioned(
            store,
            3,
            asked.as_ptr(),
            null_mut(),
            versions.as_mut_ptr(),
        ));
        assert_eq!(versions[2].sequence, 2);

        // Bad input: nothing written, no buffer made.
        let mut buffers = [std::ptr::dangling_mut(); 2];
        let mut versions = [marker; 2];
        fails(
            trebuchet_store_load_many_versioned(
                store,
                2,
                asked.as_ptr(),
                buffers.as_mut_ptr(),
                null_mut(),
            ),
            TREBUCHET_NULL_ARGUMENT,
            "versions_out",
        );
        fails(
            trebuchet_store_load_many_versioned(
                store,
                2,
                [c"kept".as_ptr(), c"".as_ptr()].as_ptr(),
                buffers.as_mut_ptr(),
                versions.as_mut_ptr(),
            ),
            TREBUCHET_INVALID_ACTOR_ID,
            "actor id is empty",
        );
        fails(
            trebuchet_store_load_many_versioned(
                store,
                2,
                null(),
                buffers.as_mut_ptr(),
                versions.as_mut_ptr(),
            ),
            TREBUCHET_NULL_ARGUMENT,
            "actor_ids",
        );
        assert_eq!(buffers, [std::ptr::dangling_mut(); 2]);
        assert_eq!(versions, [marker; 2]);
        ok(trebuchet_store_load_many_versioned(
            store,
            0,
            null(),
            null_mut(),
            null_mut(),
        ));
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn a_batch_commits_its_steps_in_order_or_nothing() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: live handles, valid strings, data and out-pointers.
    unsafe {
        ok(trebuchet_store_save(
            store,
            c"player-1".as_ptr(),
            b"sword".as_ptr(),
            5,
            null_mut(),
        ));
        ok(trebuchet_store_save(
            store,
            c"offer-9".as_ptr(),
            b"o".as_ptr(),
            1,
            null_mut(),
        ));
        let mut batch = null_mut();
        ok(trebuchet_batch_new(store, &mut batch));
        ok(trebuchet_batch_save_if(
            batch,
            c"player-1".as_ptr(),
            null(),
            0,
            1,
        ));
        ok(trebuchet_batch_save(
            batch,
            c"player-2".as_ptr(),
            b"sword".as_ptr(),
            5,
        ));
        ok(trebuchet_batch_delete(batch, c"offer-9".as_ptr()));
        ok(trebuchet_batch_delete(batch, c"nobody".as_ptr()));
        let mut count = 0;
        ok(trebuchet_batch_count(batch, &mut count));
        assert_eq!(count, 4);

        let unset = trebuchet_step_result {
            sequence: 99,
            deleted: false,
        };
        let mut results = [unset; 4];
        fails(
            trebuchet_batch_commit(batch, 3, results.as_mut_ptr()),
            TREBUCHET_INVALID_ARGUMENT,
            "count",
        );
        assert_eq!(results, [unset; 4]);
        ok(trebuchet_batch_commit(batch, 4, results.as_mut_ptr()));
        assert_eq!(
            results,
            [
                trebuchet_step_result {
                    sequence: 2,
                    deleted: false
                },
                trebuchet_step_result {
                    sequence: 1,
                    deleted: false
                },
                trebuchet_step_result {
                    sequence: 0,
                    deleted: true
                },
                trebuchet_step_result {
                    sequence: 0,
                    deleted: false
                },
            ]
        );
        ok(trebuchet_batch_count(batch, &mut count));
        assert_eq!(count, 0, "empty again after a commit");
        let mut exists = true;
        ok(trebuchet_store_exists(
            store,
            c"offer-9".as_ptr(),
            &mut exists,
        ));
        assert!(!exists);

        // A failed condition: nothing applied, the steps kept, the actual
        // number as data.
        ok(trebuchet_batch_save(
            batch,
            c"player-3".as_ptr(),
            b"shield".as_ptr(),
            6,
        ));
        ok(trebuchet_batch_save_if(
            batch,
            c"player-1".as_ptr(),
            b"x".as_ptr(),
            1,
            1,
        ));
        let mut results = [unset; 2];
        let status = trebuchet_batch_commit(batch, 2, results.as_mut_ptr());
        assert_eq!(status, TREBUCHET_CONFLICT, "{}", last_error());
        assert!(last_error().contains("player-1"), "{}", last_error());
        assert_eq!(last_conflict_actual(), Some(2));
        assert_eq!(results, [unset; 2]);
        ok(trebuchet_store_exists(
            store,
            c"player-3".as_ptr(),
            &mut exists,
        ));
        assert!(!exists, "nothing was applied");
        ok(trebuchet_batch_count(batch, &mut count));
        assert_eq!(count, 2, "the steps are kept");
        trebuchet_batch_free(&mut batch);
        assert!(batch.is_null());
        trebuchet_batch_free(&mut batch);

        // The batch keeps its store alive; results are optional.
        ok(trebuchet_batch_new(store, &mut batch));
        ok(trebuchet_batch_save(
            batch,
            c"player-3".as_ptr(),
            b"shield".as_ptr(),
            6,
        ));
        trebuchet_store_free(&mut store);
        ok(trebuchet_batch_commit(batch, 0, null_mut()));
        trebuchet_batch_free(&mut batch);
        let mut store = open_store(&schema);
        ok(trebuchet_store_exists(
            store,
            c"player-3".as_ptr(),
            &mut exists,
        ));
        assert!(exists);
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn a_batch_refuses_bad_arguments_and_leaves_outputs_untouched() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: NULLs, bad ids and wrong handles are what is tested; the rest
    // is valid.
    unsafe {
        let mut batch = null_mut();
        fails(
            trebuchet_batch_new(null(), &mut batch),
            TREBUCHET_NULL_ARGUMENT,
            "store",
        );
        assert!(batch.is_null());
        fails(
            trebuchet_batch_new(store, null_mut()),
            TREBUCHET_NULL_ARGUMENT,
            "batch_out",
        );
        let mut options = null_mut();
        ok(trebuchet_write_options_new(&mut options));
        fails(
            trebuchet_batch_new(options.cast(), &mut batch),
            TREBUCHET_WRONG_HANDLE,
            "trebuchet_store",
        );
        assert!(batch.is_null());
        trebuchet_write_options_free(&mut options);
        ok(trebuchet_batch_new(store, &mut batch));
        fails(
            trebuchet_batch_save(null_mut(), c"a".as_ptr(), null(), 0),
            TREBUCHET_NULL_ARGUMENT,
            "batch",
        );
        fails(
            trebuchet_batch_save(batch, null(), null(), 0),
            TREBUCHET_NULL_ARGUMENT,
            "actor_id",
        );
        fails(
            trebuchet_batch_save(batch, c"a".as_ptr(), null(), 2),
            TREBUCHET_NULL_ARGUMENT,
            "data",
        );
        fails(
            trebuchet_batch_save_if(batch, c"".as_ptr(), null(), 0, 0),
            TREBUCHET_INVALID_ACTOR_ID,
            "actor id is empty",
        );
        fails(
            trebuchet_batch_delete(batch, c"".as_ptr()),
            TREBUCHET_INVALID_ACTOR_ID,
            "actor id is empty",
        );
        fails(
            trebuchet_batch_delete(store.cast(), c"a".as_ptr()),
            TREBUCHET_WRONG_HANDLE,
            "trebuchet_batch",
        );
        let mut count = 99;
        fails(
            trebuchet_batch_count(batch, null_mut()),
            TREBUCHET_NULL_ARGUMENT,
            "count_out",
        );
        ok(trebuchet_batch_count(batch, &mut count));
        assert_eq!(count, 0, "no refused step was added");
        fails(
            trebuchet_batch_commit(null_mut(), 0, null_mut()),
            TREBUCHET_NULL_ARGUMENT,
            "batch",
        );
        // An expected number out of range fails the commit.
        ok(trebuchet_batch_save_if(
            batch,
            c"a".as_ptr(),
            null(),
            0,
            u64::MAX,
        ));
        fails(
            trebuchet_batch_commit(batch, 0, null_mut()),
            TREBUCHET_INVALID_ARGUMENT,
            &u64::MAX.to_string(),
        );
        let mut exists = true;
        ok(trebuchet_store_exists(store, c"a".as_ptr(), &mut exists));
        assert!(!exists);
        // An empty batch commits nothing.
        trebuchet_batch_free(&mut batch);
        ok(trebuchet_batch_new(store, &mut batch));
        ok(trebuchet_batch_commit(batch, 0, [].as_mut_ptr()));
        let mut wrong: *mut trebuchet_batch = store.cast();
        trebuchet_batch_free(&mut wrong);
        assert_eq!(wrong, store.cast());
        trebuchet_batch_free(&mut batch);
        trebuchet_batch_free(null_mut());
        trebuchet_store_free(&mut store);
    }
}
