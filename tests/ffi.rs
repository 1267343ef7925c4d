//! The C ABI (feature `ffi`) against a real PostgreSQL: from Rust through
//! the exported functions, and from C by building the C library
//! (`trebuchet-postgres-ffi`), compiling `examples/c/quickstart.c` and
//! `tests/c/ffi_test.c` with the system compiler (`cc`), and running them,
//! the example also under valgrind.
#![allow(unsafe_code)] // calls the C ABI as C would

mod common;

use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use trebuchet_postgres::ffi::*;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};

fn last_error() -> String {
    // SAFETY: never NULL, valid until the next call on this thread.
    unsafe { CStr::from_ptr(trebuchet_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A store handle on a fresh, migrated schema.
fn open_store(schema: &TestSchema) -> *mut trebuchet_store {
    let url = std::ffi::CString::new(TestDatabase::shared().url()).unwrap();
    let table = std::ffi::CString::new(schema.table("actor_states")).unwrap();
    let channel = std::ffi::CString::new(schema.channel()).unwrap();
    let mut store = std::ptr::null_mut();
    // SAFETY: valid strings and out-pointer.
    unsafe {
        let status =
            trebuchet_store_open(url.as_ptr(), table.as_ptr(), channel.as_ptr(), &mut store);
        assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
        assert_eq!(
            trebuchet_store_migrate(store),
            trebuchet_status::TREBUCHET_OK
        );
    }
    store
}

#[test]
fn null_arguments_fail_and_leave_outputs_untouched() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: NULLs are what is being tested; the rest is valid.
    unsafe {
        let mut sequence = 42u64;
        let status = trebuchet_store_sequence(store, std::ptr::null(), &mut sequence);
        assert_eq!(status, trebuchet_status::TREBUCHET_NULL_ARGUMENT);
        assert_eq!(sequence, 42);
        assert!(last_error().contains("actor_id"), "{}", last_error());
        let status = trebuchet_store_save(
            std::ptr::null(),
            c"a".as_ptr(),
            std::ptr::null(),
            0,
            &mut sequence,
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_NULL_ARGUMENT);
        assert_eq!(sequence, 42);
        let status = trebuchet_store_load(store, c"a".as_ptr(), std::ptr::null_mut());
        assert_eq!(status, trebuchet_status::TREBUCHET_NULL_ARGUMENT);
        trebuchet_store_free(std::ptr::null_mut());
        trebuchet_store_free(&mut store);
        assert!(store.is_null());
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn invalid_utf8_in_an_actor_id_is_rejected() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    let bad = b"room-\xff\0";
    // SAFETY: NUL-terminated bytes.
    unsafe {
        let mut sequence = 0;
        let status = trebuchet_store_save(
            store,
            bad.as_ptr().cast::<c_char>(),
            b"x".as_ptr(),
            1,
            &mut sequence,
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_INVALID_UTF8);
        assert_eq!(sequence, 0);
        assert!(last_error().contains("UTF-8"), "{}", last_error());
        let mut exists = true;
        let status = trebuchet_store_exists(store, c"".as_ptr(), &mut exists);
        assert_eq!(status, trebuchet_status::TREBUCHET_INVALID_ACTOR_ID);
        assert!(exists);
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn an_expected_sequence_out_of_range_is_an_invalid_argument_and_writes_nothing() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: valid strings, data and out-pointers.
    unsafe {
        let mut sequence = 7u64;
        let status = trebuchet_store_save_if(
            store,
            c"room".as_ptr(),
            b"x".as_ptr(),
            1,
            u64::MAX,
            &mut sequence,
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_INVALID_ARGUMENT);
        assert_eq!(sequence, 7);
        assert!(
            last_error().contains(&u64::MAX.to_string()),
            "{}",
            last_error()
        );
        let name = CStr::from_ptr(trebuchet_status_name(status as std::ffi::c_int));
        assert_eq!(name.to_str().unwrap(), "TREBUCHET_INVALID_ARGUMENT");
        let mut exists = true;
        let status = trebuchet_store_exists(store, c"room".as_ptr(), &mut exists);
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        assert!(!exists, "nothing was written");
        trebuchet_store_free(&mut store);
    }
}

/// Every id of the listing of `prefix`, walking pages of `limit`, and how
/// many pages it took.
///
/// # Safety
///
/// `store` is a live store handle.
unsafe fn list_all(
    store: *const trebuchet_store,
    prefix: &std::ffi::CStr,
    limit: u32,
) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut token: Option<std::ffi::CString> = None;
    loop {
        let mut page = std::ptr::null_mut();
        // SAFETY: valid strings and out-pointers; the page is freed below.
        unsafe {
            let status = trebuchet_store_list_ids(
                store,
                prefix.as_ptr(),
                token.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
                limit,
                &mut page,
            );
            assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
            pages += 1;
            let mut count = usize::MAX;
            assert_eq!(
                trebuchet_id_page_count(page, &mut count),
                trebuchet_status::TREBUCHET_OK
            );
            assert!(count <= limit as usize);
            for index in 0..count {
                let (mut id, mut len) = (std::ptr::null(), 0usize);
                assert_eq!(
                    trebuchet_id_page_get(page, index, &mut id, &mut len),
                    trebuchet_status::TREBUCHET_OK
                );
                let id = CStr::from_ptr(id).to_str().unwrap().to_owned();
                assert_eq!(id.len(), len);
                ids.push(id);
            }
            let mut next = std::ptr::null();
            assert_eq!(
                trebuchet_id_page_next(page, &mut next),
                trebuchet_status::TREBUCHET_OK
            );
            token = (!next.is_null()).then(|| CStr::from_ptr(next).to_owned());
            trebuchet_id_page_free(&mut page);
            assert!(page.is_null());
        }
        if token.is_none() {
            return (ids, pages);
        }
    }
}

#[test]
fn ids_are_listed_page_by_page_and_counted() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: valid strings, data and out-pointers.
    unsafe {
        for id in [c"room-3", c"room-1", c"room-2", c"user-1", c"room-10"] {
            let status =
                trebuchet_store_save(store, id.as_ptr(), b"x".as_ptr(), 1, std::ptr::null_mut());
            assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
        }
        let (rooms, pages) = list_all(store, c"room-", 2);
        let mut expected = vec!["room-1", "room-10", "room-2", "room-3"];
        let mut sorted = rooms.clone();
        sorted.sort();
        expected.sort();
        assert_eq!(sorted, expected, "every room once, in key order: {rooms:?}");
        assert_eq!(pages, 2, "4 ids in pages of 2, the last page says so");
        let (all, _) = list_all(store, c"", 100);
        assert_eq!(all.len(), 5);

        let mut count = 0u64;
        let status = trebuchet_store_count_actors(store, c"room-".as_ptr(), &mut count);
        assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
        assert_eq!(count, 4);
        let status = trebuchet_store_count_actors(store, std::ptr::null(), &mut count);
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        assert_eq!(count, 5, "NULL is every actor");

        // Bad arguments: typed statuses, outputs untouched.
        let mut page = std::ptr::null_mut();
        let status =
            trebuchet_store_list_ids(store, c"room-".as_ptr(), std::ptr::null(), 0, &mut page);
        assert_eq!(status, trebuchet_status::TREBUCHET_INVALID_ARGUMENT);
        assert!(last_error().contains("limit"), "{}", last_error());
        assert!(page.is_null());
        let status =
            trebuchet_store_list_ids(store, c"room-".as_ptr(), std::ptr::null(), 2, &mut page);
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        let mut next = std::ptr::null();
        assert_eq!(
            trebuchet_id_page_next(page, &mut next),
            trebuchet_status::TREBUCHET_OK
        );
        let (mut last, mut last_len) = (std::ptr::null(), 0usize);
        assert_eq!(
            trebuchet_id_page_get(page, 1, &mut last, &mut last_len),
            trebuchet_status::TREBUCHET_OK
        );
        assert_eq!(
            CStr::from_ptr(next).to_bytes(),
            std::slice::from_raw_parts(last.cast::<u8>(), last_len),
            "the next page starts after the last id of this one"
        );
        let (mut id, mut len) = (std::ptr::null(), 99usize);
        let status = trebuchet_id_page_get(page, 2, &mut id, &mut len);
        assert_eq!(status, trebuchet_status::TREBUCHET_INVALID_ARGUMENT);
        assert!(last_error().contains("index 2"), "{}", last_error());
        assert!(id.is_null() && len == 99);
        let status = trebuchet_id_page_get(page, 0, &mut id, std::ptr::null_mut());
        assert_eq!(
            status,
            trebuchet_status::TREBUCHET_OK,
            "len_out may be NULL"
        );
        assert_eq!(CStr::from_ptr(id).to_str().unwrap().len(), 6);
        let status = trebuchet_id_page_count(store.cast(), &mut len);
        assert_eq!(status, trebuchet_status::TREBUCHET_WRONG_HANDLE);
        trebuchet_id_page_free(&mut page);
        trebuchet_id_page_free(&mut page);
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn many_actors_are_saved_loaded_and_deleted_in_one_call_each() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    let ids = [c"bulk-1".as_ptr(), c"bulk-2".as_ptr(), c"bulk-3".as_ptr()];
    let data = [b"one".as_ptr(), std::ptr::null(), b"three".as_ptr()];
    let lens = [3usize, 0, 5];
    // SAFETY: arrays of `ids.len()` elements, valid strings and bytes.
    unsafe {
        let mut sequences = [0u64; 3];
        let status = trebuchet_store_save_many(
            store,
            3,
            ids.as_ptr(),
            data.as_ptr(),
            lens.as_ptr(),
            sequences.as_mut_ptr(),
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
        assert_eq!(sequences, [1, 1, 1]);
        let status = trebuchet_store_save_many(
            store,
            3,
            ids.as_ptr(),
            data.as_ptr(),
            lens.as_ptr(),
            sequences.as_mut_ptr(),
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        assert_eq!(sequences, [2, 2, 2]);

        let asked = [c"bulk-3".as_ptr(), c"nobody".as_ptr(), c"bulk-2".as_ptr()];
        let mut buffers = [std::ptr::null_mut(); 3];
        let status = trebuchet_store_load_many(store, 3, asked.as_ptr(), buffers.as_mut_ptr());
        assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
        assert!(buffers[1].is_null(), "an actor that does not exist");
        for (buffer, expected) in [(buffers[0], &b"three"[..]), (buffers[2], &b""[..])] {
            let (mut ptr, mut len) = (std::ptr::null(), usize::MAX);
            assert_eq!(
                trebuchet_buffer_get(buffer, &mut ptr, &mut len),
                trebuchet_status::TREBUCHET_OK
            );
            assert_eq!(std::slice::from_raw_parts(ptr, len), expected);
        }
        for buffer in &mut buffers {
            trebuchet_buffer_free(buffer);
        }

        let gone = [c"bulk-1".as_ptr(), c"nobody".as_ptr()];
        let mut deleted = [false, true];
        let status = trebuchet_store_delete_many(store, 2, gone.as_ptr(), deleted.as_mut_ptr());
        assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
        assert_eq!(deleted, [true, false]);

        // Bad input: a typed status, nothing written, outputs untouched.
        let twice = [c"bulk-2".as_ptr(), c"bulk-2".as_ptr()];
        let mut sequences = [7u64; 2];
        let status = trebuchet_store_save_many(
            store,
            2,
            twice.as_ptr(),
            data.as_ptr(),
            lens.as_ptr(),
            sequences.as_mut_ptr(),
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_INVALID_ARGUMENT);
        assert_eq!(sequences, [7, 7]);
        let with_null = [c"bulk-9".as_ptr(), std::ptr::null()];
        let status = trebuchet_store_save_many(
            store,
            2,
            with_null.as_ptr(),
            data.as_ptr(),
            lens.as_ptr(),
            std::ptr::null_mut(),
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_NULL_ARGUMENT);
        assert!(last_error().contains("actor_ids[1]"), "{}", last_error());
        let no_bytes = [b"x".as_ptr(), std::ptr::null()];
        let status = trebuchet_store_save_many(
            store,
            2,
            [c"bulk-8".as_ptr(), c"bulk-9".as_ptr()].as_ptr(),
            no_bytes.as_ptr(),
            [1usize, 4].as_ptr(),
            std::ptr::null_mut(),
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_NULL_ARGUMENT);
        let status = trebuchet_store_load_many(store, 1, asked.as_ptr(), std::ptr::null_mut());
        assert_eq!(status, trebuchet_status::TREBUCHET_NULL_ARGUMENT);
        let mut exists = true;
        for id in [c"bulk-8", c"bulk-9"] {
            trebuchet_store_exists(store, id.as_ptr(), &mut exists);
            assert!(!exists, "nothing was written");
        }
        assert_eq!(
            trebuchet_store_sequence(store, c"bulk-2".as_ptr(), &mut sequences[0]),
            trebuchet_status::TREBUCHET_OK
        );
        assert_eq!(sequences[0], 2);
        // An empty batch does nothing, with NULL arrays.
        let status = trebuchet_store_save_many(
            store,
            0,
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null_mut(),
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        let status = trebuchet_store_load_many(store, 0, std::ptr::null(), std::ptr::null_mut());
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn a_state_saved_with_a_ttl_reads_as_absent_once_it_expires() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: valid strings, data and out-pointers.
    unsafe {
        let mut sequence = 0u64;
        let status = trebuchet_store_save_with_ttl(
            store,
            c"session".as_ptr(),
            b"s".as_ptr(),
            1,
            0,
            &mut sequence,
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_INVALID_ARGUMENT);
        assert!(last_error().contains("ttl"), "{}", last_error());
        assert_eq!(sequence, 0);

        // Long enough for the calls before it expires, even on a busy
        // machine.
        const TTL_MS: u64 = 3000;
        let status = trebuchet_store_save_with_ttl(
            store,
            c"session".as_ptr(),
            b"s".as_ptr(),
            1,
            TTL_MS,
            &mut sequence,
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
        assert_eq!(sequence, 1, "the refused call wrote nothing");
        let mut exists = false;
        trebuchet_store_exists(store, c"session".as_ptr(), &mut exists);
        assert!(exists);
        // A second actor's ttl is cleared by a later plain save.
        trebuchet_store_save_with_ttl(
            store,
            c"kept".as_ptr(),
            b"k".as_ptr(),
            1,
            TTL_MS,
            std::ptr::null_mut(),
        );
        // The server set the first time to live before this.
        let kept_ttl_set = Instant::now();
        trebuchet_store_save(
            store,
            c"kept".as_ptr(),
            b"k".as_ptr(),
            1,
            std::ptr::null_mut(),
        );

        common::wait_until("session expires", Duration::from_secs(60), || {
            let mut exists = true;
            let status = trebuchet_store_exists(store, c"session".as_ptr(), &mut exists);
            assert_eq!(status, trebuchet_status::TREBUCHET_OK, "{}", last_error());
            !exists
        });
        // Past the time to live "kept" first had, too.
        let left = (kept_ttl_set + Duration::from_millis(TTL_MS))
            .saturating_duration_since(Instant::now());
        std::thread::sleep(left);
        let mut buffer = std::ptr::null_mut();
        let status = trebuchet_store_load(store, c"session".as_ptr(), &mut buffer);
        assert_eq!(status, trebuchet_status::TREBUCHET_NOT_FOUND);
        assert!(buffer.is_null());
        trebuchet_store_exists(store, c"kept".as_ptr(), &mut exists);
        assert!(exists, "a plain save keeps the actor for good");
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn a_buffer_cannot_be_freed_twice_through_its_variable() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: valid handles and pointers.
    unsafe {
        let status = trebuchet_store_save(
            store,
            c"a".as_ptr(),
            b"abc".as_ptr(),
            3,
            std::ptr::null_mut(),
        );
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        let mut buffer = std::ptr::null_mut();
        let mut sequence = 0;
        let status =
            trebuchet_store_load_versioned(store, c"a".as_ptr(), &mut buffer, &mut sequence);
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        assert_eq!(sequence, 1);
        let (mut data, mut len) = (std::ptr::null(), 0);
        assert_eq!(
            trebuchet_buffer_get(buffer, &mut data, &mut len),
            trebuchet_status::TREBUCHET_OK
        );
        assert_eq!(std::slice::from_raw_parts(data, len), b"abc");
        trebuchet_buffer_free(&mut buffer);
        assert!(buffer.is_null());
        trebuchet_buffer_free(&mut buffer); // a no-op
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn a_handle_of_another_kind_is_refused() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: live handles of the wrong kind, which is what is tested.
    unsafe {
        let mut listener = std::ptr::null_mut();
        assert_eq!(
            trebuchet_listener_open(store, &mut listener),
            trebuchet_status::TREBUCHET_OK
        );
        let status = trebuchet_store_migrate(listener.cast());
        assert_eq!(status, trebuchet_status::TREBUCHET_WRONG_HANDLE);
        assert!(last_error().contains("trebuchet_store"), "{}", last_error());
        let mut wrong: *mut trebuchet_store = listener.cast();
        trebuchet_store_free(&mut wrong); // not a store: left alone
        assert_eq!(wrong, listener.cast());
        trebuchet_listener_free(&mut listener);
        trebuchet_store_free(&mut store);
    }
}

#[test]
fn a_connect_failure_names_no_password() {
    let mut store = std::ptr::null_mut();
    // SAFETY: valid strings and out-pointer.
    let status = unsafe {
        trebuchet_store_open(
            c"postgresql://someone:pa55-w0rd-xyz@127.0.0.1:1/db?connect_timeout=2".as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            &mut store,
        )
    };
    assert_eq!(status, trebuchet_status::TREBUCHET_CONNECT_FAILED);
    assert!(store.is_null());
    let message = last_error();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("pa55-w0rd-xyz"), "{message}");
}

/// Handles are plain pointers; these tests move them between threads.
struct SendPtr<T>(*mut T);

/// Whether this process's thread named `name` is asleep (state `S` in
/// `/proc`), as a thread blocked in a wait is.
fn thread_sleeps(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let path = task.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            (comm.trim() == name).then(|| std::fs::read_to_string(path.join("stat")).ok())?
        })
        // The state follows the name in parentheses.
        .any(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('S'))
        })
}
// SAFETY: the library's store, listener and subscription are thread-safe.
unsafe impl<T> Send for SendPtr<T> {}

#[test]
fn a_wait_times_out_and_shutdown_wakes_a_waiting_thread() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    // SAFETY: valid handles; the subscription outlives the waiting thread.
    unsafe {
        let mut listener = std::ptr::null_mut();
        assert_eq!(
            trebuchet_listener_open(store, &mut listener),
            trebuchet_status::TREBUCHET_OK
        );
        let mut subscription = std::ptr::null_mut();
        let status = trebuchet_listener_subscribe(listener, std::ptr::null(), &mut subscription);
        assert_eq!(status, trebuchet_status::TREBUCHET_OK);
        let mut event = std::mem::MaybeUninit::<trebuchet_event>::uninit();
        let start = Instant::now();
        let status = trebuchet_subscription_next(subscription, 150, event.as_mut_ptr());
        assert_eq!(status, trebuchet_status::TREBUCHET_TIMEOUT);
        assert!(start.elapsed() >= Duration::from_millis(140));

        // A wait of a minute: only the shutdown ends it sooner, with CLOSED
        // rather than TIMEOUT.
        let waiting = SendPtr(subscription);
        let waiter = std::thread::Builder::new()
            .name("ffi-waiter".into())
            .spawn(move || {
                let waiting = waiting;
                let mut event = std::mem::MaybeUninit::<trebuchet_event>::uninit();
                let start = Instant::now();
                let status = trebuchet_subscription_next(waiting.0, 60_000, event.as_mut_ptr());
                (status, start.elapsed())
            })
            .unwrap();
        // Shut down once the waiter sleeps inside the call.
        common::wait_until("the waiter waits", Duration::from_secs(60), || {
            thread_sleeps("ffi-waiter")
        });
        assert_eq!(
            trebuchet_listener_shutdown(listener),
            trebuchet_status::TREBUCHET_OK
        );
        let (status, waited) = waiter.join().unwrap();
        assert_eq!(status, trebuchet_status::TREBUCHET_CLOSED);
        eprintln!("the shutdown woke the waiter after {waited:?} of waiting");
        trebuchet_subscription_free(&mut subscription);
        trebuchet_listener_free(&mut listener);
        trebuchet_store_free(&mut store);
    }
}

/// The directory holding `libtrebuchet_postgres_c.{so,a}`, built once by
/// `cargo build -p trebuchet-postgres-ffi` into this test's own target
/// directory and profile (so the dependencies already built are reused).
fn c_library_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/ffi-<hash>
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target_dir = profile_dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        command
            .args([
                "build",
                "--quiet",
                "-p",
                "trebuchet-postgres-ffi",
                "--target-dir",
            ])
            .arg(target_dir)
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            command.arg("--release");
        }
        let status = command.status().expect("cannot run cargo");
        assert!(status.success(), "building the C library failed");
        assert!(profile_dir.join("libtrebuchet_postgres_c.so").exists());
        profile_dir
    })
}

/// How a C program links the library.
#[derive(Clone, Copy, PartialEq)]
enum Linking {
    Shared,
    Static,
}

/// Whether the C compiler is there (see `common::tool_found`).
fn have_cc() -> bool {
    common::program_found("cc", &["--version"], "gcc")
}

/// Compiles one C file against the header and the library.
fn compile_c(source: &str, name: &str, linking: Linking) -> PathBuf {
    let lib = c_library_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = lib.join(format!("c-{name}"));
    let mut command = Command::new("cc");
    command
        .args(["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-g"])
        .args(["-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root.join("ffi").join("include"))
        .arg(root.join(source));
    match linking {
        Linking::Shared => {
            command
                .arg("-L")
                .arg(lib)
                .arg("-ltrebuchet_postgres_c")
                .arg(format!("-Wl,-rpath,{}", lib.display()))
                .arg("-lpthread");
        }
        Linking::Static => {
            // What `cargo rustc ... -- --print native-static-libs` lists on Linux.
            command
                .arg(lib.join("libtrebuchet_postgres_c.a"))
                .args(["-lssl", "-lcrypto", "-lgcc_s", "-lutil", "-lrt"])
                .args(["-lpthread", "-lm", "-ldl", "-lc"]);
        }
    }
    let output = command.arg("-o").arg(&out).output().expect("cannot run cc");
    assert!(
        output.status.success(),
        "cc {source} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Compiles the quick-start example as `name` (one name per test, since
/// tests run in parallel) and runs it against a fresh schema, returning stdout.
fn run_example(name: &str, linking: Linking, wrapper: &[&str]) -> String {
    let program = compile_c("examples/c/quickstart.c", name, linking);
    let schema = TestDatabase::shared().schema();
    let (first, rest) = match wrapper.split_first() {
        Some((first, rest)) => (first.to_string(), rest.to_vec()),
        None => (program.display().to_string(), Vec::new()),
    };
    let mut command = Command::new(first);
    command.args(rest);
    if !wrapper.is_empty() {
        command.arg(&program);
    }
    let output = command
        .arg(TestDatabase::shared().url())
        .env("TREBUCHET_TABLE", schema.table("actor_states"))
        .env("TREBUCHET_CHANNEL", schema.channel())
        .output()
        .expect("cannot run the example");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "example failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

#[test]
fn c_example_saves_loads_and_prints_a_change() {
    if !have_cc() {
        return;
    }
    let stdout = run_example("quickstart", Linking::Shared, &[]);
    assert_eq!(
        stdout,
        "saved room-1 at sequence 1\n\
         loaded room-1: {\"players\":2}\n\
         change: room-1 saved at sequence 1\n"
    );
}

#[test]
fn c_example_links_the_static_library() {
    if !have_cc() {
        return;
    }
    let stdout = run_example("quickstart-static", Linking::Static, &[]);
    assert!(
        stdout.ends_with("change: room-1 saved at sequence 1\n"),
        "{stdout}"
    );
}

#[test]
fn c_tests_pass_against_a_real_server() {
    if !have_cc() {
        return;
    }
    let program = compile_c("tests/c/ffi_test.c", "ffi_test", Linking::Shared);
    let schema = TestDatabase::shared().schema();
    let output = Command::new(&program)
        .arg(TestDatabase::shared().url())
        .arg(schema.table("actor_states"))
        .arg(schema.channel())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "C tests failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for name in [
        "status_names",
        "null_arguments",
        "invalid_input",
        "save_load_and_double_free",
        "conditional_saves",
        "conflict_data",
        "time_to_live",
        "bulk",
        "listing",
        "transforms",
        "wrong_handles",
        "timeouts_and_changes",
        "shutdown_with_waiter",
        "store_options",
        "general_write",
        "conditional_bulk",
        "batches",
        "versions",
    ] {
        assert!(stdout.contains(&format!("ok {name}\n")), "{stdout}");
    }
    assert!(stdout.ends_with("all passed\n"), "{stdout}");
}

#[test]
fn c_example_has_no_leaks_under_valgrind() {
    if !have_cc() || !common::program_found("valgrind", &["--version"], "valgrind") {
        return;
    }
    let stdout = run_example(
        "quickstart-valgrind",
        Linking::Shared,
        &[
            "valgrind",
            "--quiet",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=99",
        ],
    );
    assert!(stdout.contains("change: room-1 saved"), "{stdout}");
}
