//! The C ABI's error reporting (feature `ffi`), called from Rust as C calls
//! it: a name for any status number, and the actual sequence number of a
//! conflict as data. The same checks run from C in `tests/c/ffi_test.c`.
#![allow(unsafe_code)] // calls the C ABI as C would

use std::ffi::{c_int, CStr, CString};

use trebuchet_postgres::ffi::*;
use trebuchet_postgres::testing::{TestDatabase, TestSchema};

fn status_name(status: c_int) -> &'static str {
    // SAFETY: never NULL; a static string.
    unsafe { CStr::from_ptr(trebuchet_status_name(status)) }
        .to_str()
        .expect("status names are ASCII")
}

/// The actual sequence number of the calling thread's last conflict, if its
/// last call failed with one.
fn last_conflict_actual() -> Option<u64> {
    let mut actual = u64::MAX;
    // SAFETY: a writable u64.
    let found = unsafe { trebuchet_last_conflict_actual(&mut actual) };
    if found {
        Some(actual)
    } else {
        assert_eq!(actual, u64::MAX, "written although there was no conflict");
        None
    }
}

fn last_error() -> String {
    // SAFETY: never NULL, valid until the next call on this thread.
    unsafe { CStr::from_ptr(trebuchet_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A store handle on a fresh, migrated schema.
fn open_store(schema: &TestSchema) -> *mut trebuchet_store {
    let url = CString::new(TestDatabase::shared().url()).unwrap();
    let table = CString::new(schema.table("actor_states")).unwrap();
    let channel = CString::new(schema.channel()).unwrap();
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

/// `trebuchet_store_save_if` of one byte.
fn save_if(store: *const trebuchet_store, id: &CStr, expected: u64) -> trebuchet_status {
    // SAFETY: a live store, a NUL-terminated id, one readable byte.
    unsafe {
        trebuchet_store_save_if(
            store,
            id.as_ptr(),
            b"x".as_ptr(),
            1,
            expected,
            std::ptr::null_mut(),
        )
    }
}

#[test]
fn any_number_has_a_status_name_and_unknown_ones_share_one() {
    assert_eq!(status_name(0), "TREBUCHET_OK");
    assert_eq!(
        status_name(trebuchet_status::TREBUCHET_CONFLICT as c_int),
        "TREBUCHET_CONFLICT"
    );
    assert_eq!(status_name(106), "TREBUCHET_INVALID_ARGUMENT");
    assert_eq!(status_name(999), "TREBUCHET_OTHER");
    for unknown in [4, 99, 107, 1000, -1, c_int::MAX, c_int::MIN] {
        assert_eq!(
            status_name(unknown),
            "TREBUCHET_UNKNOWN_STATUS",
            "{unknown}"
        );
    }
}

#[test]
fn a_conflict_gives_the_actual_sequence_as_data() {
    let schema = TestDatabase::shared().schema();
    let mut store = open_store(&schema);
    assert_eq!(last_conflict_actual(), None);
    assert_eq!(
        save_if(store, c"room", TREBUCHET_EXPECT_ABSENT),
        trebuchet_status::TREBUCHET_OK
    );
    assert_eq!(save_if(store, c"room", 1), trebuchet_status::TREBUCHET_OK);

    assert_eq!(
        save_if(store, c"room", 1),
        trebuchet_status::TREBUCHET_CONFLICT
    );
    assert_eq!(last_conflict_actual(), Some(2));
    // Reading the message or a status name does not forget it.
    assert!(
        last_error().contains("found sequence 2"),
        "{}",
        last_error()
    );
    assert_eq!(status_name(200), "TREBUCHET_CONFLICT");
    assert_eq!(last_conflict_actual(), Some(2));
    // The actual number is what a retry expects.
    assert_eq!(save_if(store, c"room", 2), trebuchet_status::TREBUCHET_OK);
    assert_eq!(last_conflict_actual(), None, "a success forgets it");

    assert_eq!(
        save_if(store, c"room", TREBUCHET_EXPECT_ABSENT),
        trebuchet_status::TREBUCHET_CONFLICT
    );
    assert_eq!(last_conflict_actual(), Some(3));
    // An actor that does not exist: 0, TREBUCHET_EXPECT_ABSENT.
    assert_eq!(
        save_if(store, c"nobody", 5),
        trebuchet_status::TREBUCHET_CONFLICT
    );
    assert_eq!(last_conflict_actual(), Some(TREBUCHET_EXPECT_ABSENT));
    // Another error forgets it too.
    assert_eq!(
        save_if(store, c"room", u64::MAX),
        trebuchet_status::TREBUCHET_INVALID_ARGUMENT
    );
    assert_eq!(last_conflict_actual(), None);

    // A NULL out-parameter still answers whether there was one.
    assert_eq!(
        save_if(store, c"room", 1),
        trebuchet_status::TREBUCHET_CONFLICT
    );
    // SAFETY: NULL is allowed.
    assert!(unsafe { trebuchet_last_conflict_actual(std::ptr::null_mut()) });

    // Per thread, as the last error is.
    let elsewhere = std::thread::spawn(last_conflict_actual).join().unwrap();
    assert_eq!(elsewhere, None);
    assert_eq!(last_conflict_actual(), Some(3));
    // SAFETY: a live handle, freed once.
    unsafe { trebuchet_store_free(&mut store) };
}

/// No exported function takes an enum, by value or through a pointer: C
/// may put any `int` in one, and a Rust enum holding a number it has no
/// variant for is undefined behaviour. Enums only go out, as return values
/// and in `trebuchet_event`, which the library writes and never reads.
#[test]
fn no_function_takes_an_enum() {
    let header = include_str!("../ffi/include/trebuchet_postgres.h");
    let mut functions = 0;
    // Each declaration runs from its name's `(` to `);`, one parameter a line.
    for declaration in header.split(");").filter(|d| d.contains('(')) {
        let Some((head, parameters)) = declaration.rsplit_once('(') else {
            continue;
        };
        if head.contains("typedef") {
            // A callback type: C's function, called by the library with
            // nothing but integers, pointers and a bool.
            assert!(!parameters.contains("enum "), "{declaration}");
            continue;
        }
        functions += 1;
        assert!(
            !parameters.contains("enum "),
            "a parameter of {} is an enum:{parameters}",
            head.lines().last().unwrap_or(head)
        );
    }
    assert!(functions > 30, "found only {functions} declarations");
    assert!(header.contains("const char *trebuchet_status_name(int status);"));
}
