//! Opaque handles: a boxed Rust value behind a tag that tells the kinds
//! apart, and the helpers that read C arguments.

use std::ffi::{c_char, CStr};

use super::error::{fail, trebuchet_status};

/// The first field of every handle; tells a store from a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum Kind {
    Store = 0x7472_6562_5354_4f52,
    Listener = 0x7472_6562_4c53_544e,
    Subscription = 0x7472_6562_5355_4253,
    Buffer = 0x7472_6562_4255_4646,
    Output = 0x7472_6562_4f55_5450,
    IdPage = 0x7472_6562_5041_4745,
    StoreOptions = 0x7472_6562_534f_5054,
    WriteOptions = 0x7472_6562_574f_5054,
    Batch = 0x7472_6562_4254_4348,
}

/// A handle's layout: the tag, then the value. `repr(C)` puts the tag at
/// offset 0 in every kind, so it can be read before the kind is known.
#[repr(C)]
pub(crate) struct Tagged<T> {
    tag: u64,
    pub(crate) value: T,
}

impl<T> Tagged<T> {
    /// `value` tagged as `kind`, for a handle that lives on the stack for
    /// the length of one call.
    pub(crate) fn new(kind: Kind, value: T) -> Self {
        Tagged {
            tag: kind as u64,
            value,
        }
    }
}

/// Boxes `value` behind the tag of `kind`.
pub(crate) fn into_handle<T, H>(kind: Kind, value: T) -> *mut H {
    Box::into_raw(Box::new(Tagged::new(kind, value))).cast()
}

/// Borrows the value behind `handle` after checking it is non-NULL and of
/// `kind`.
///
/// # Safety
///
/// `handle` must be NULL or a live handle returned by this library.
pub(crate) unsafe fn borrow<'a, T, H>(
    handle: *const H,
    kind: Kind,
    what: &str,
) -> Result<&'a T, trebuchet_status> {
    if handle.is_null() {
        return Err(fail(
            trebuchet_status::TREBUCHET_NULL_ARGUMENT,
            format!("{what} is NULL"),
        ));
    }
    // SAFETY: every handle starts with the u64 tag (repr(C)).
    let tag = unsafe { handle.cast::<u64>().read() };
    if tag != kind as u64 {
        return Err(fail(
            trebuchet_status::TREBUCHET_WRONG_HANDLE,
            format!("{what} is not a {} handle", kind.name()),
        ));
    }
    // SAFETY: the tag says this is a Tagged<T> allocated by into_handle.
    Ok(unsafe { &(*handle.cast::<Tagged<T>>()).value })
}

/// Takes back the handle `*slot` points to and sets `*slot` to NULL, so a
/// second call with the same slot does nothing. NULL `slot`, NULL `*slot`
/// or a handle of another kind: nothing happens (and `false`).
///
/// # Safety
///
/// `slot` must be NULL or point to NULL or to a live handle of this library.
pub(crate) unsafe fn take<T, H>(slot: *mut *mut H, kind: Kind) -> Option<T> {
    if slot.is_null() {
        return None;
    }
    // SAFETY: the caller passes a valid pointer to a handle pointer.
    let handle = unsafe { *slot };
    if handle.is_null() {
        return None;
    }
    // SAFETY: as in `borrow`.
    if unsafe { handle.cast::<u64>().read() } != kind as u64 {
        return None;
    }
    // SAFETY: the slot is the caller's; clearing it is what makes a second
    // free a no-op.
    unsafe { *slot = std::ptr::null_mut() };
    // SAFETY: allocated by into_handle with this kind; the tag is cleared
    // so a stale copy of the pointer is not taken for a live handle while
    // the memory is still mapped.
    let mut boxed = unsafe { Box::from_raw(handle.cast::<Tagged<T>>()) };
    boxed.tag = 0;
    Some(boxed.value)
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Store => "trebuchet_store",
            Kind::Listener => "trebuchet_listener",
            Kind::Subscription => "trebuchet_subscription",
            Kind::Buffer => "trebuchet_buffer",
            Kind::Output => "trebuchet_output",
            Kind::IdPage => "trebuchet_id_page",
            Kind::StoreOptions => "trebuchet_store_options",
            Kind::WriteOptions => "trebuchet_write_options",
            Kind::Batch => "trebuchet_batch",
        }
    }
}

/// A required C string argument as `&str`.
///
/// # Safety
///
/// `s` must be NULL or a NUL-terminated string.
pub(crate) unsafe fn str_arg<'a>(
    s: *const c_char,
    what: &str,
) -> Result<&'a str, trebuchet_status> {
    if s.is_null() {
        return Err(fail(
            trebuchet_status::TREBUCHET_NULL_ARGUMENT,
            format!("{what} is NULL"),
        ));
    }
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }.to_str().map_err(|e| {
        fail(
            trebuchet_status::TREBUCHET_INVALID_UTF8,
            format!("{what} is not valid UTF-8 (byte {})", e.valid_up_to()),
        )
    })
}

/// An optional C string argument: NULL means `None`.
///
/// # Safety
///
/// As [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(
    s: *const c_char,
    what: &str,
) -> Result<Option<&'a str>, trebuchet_status> {
    if s.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded.
        unsafe { str_arg(s, what) }.map(Some)
    }
}

/// A byte argument: `data` may be NULL only when `len` is 0.
///
/// # Safety
///
/// `data` must point to `len` readable bytes.
pub(crate) unsafe fn bytes_arg<'a>(
    data: *const u8,
    len: usize,
) -> Result<&'a [u8], trebuchet_status> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(fail(
            trebuchet_status::TREBUCHET_NULL_ARGUMENT,
            "data is NULL but len is not 0",
        ));
    }
    // SAFETY: the caller passes `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// Checks that a required out-pointer is non-NULL.
pub(crate) fn out_arg<T>(out: *mut T, what: &str) -> Result<(), trebuchet_status> {
    if out.is_null() {
        Err(fail(
            trebuchet_status::TREBUCHET_NULL_ARGUMENT,
            format!("{what} is NULL"),
        ))
    } else {
        Ok(())
    }
}

/// An array argument of `count` elements: `items` may be NULL only when
/// `count` is 0.
///
/// # Safety
///
/// `items` must point to `count` readable elements.
pub(crate) unsafe fn array_arg<'a, T>(
    items: *const T,
    count: usize,
    what: &str,
) -> Result<&'a [T], trebuchet_status> {
    if count == 0 {
        return Ok(&[]);
    }
    if items.is_null() {
        return Err(fail(
            trebuchet_status::TREBUCHET_NULL_ARGUMENT,
            format!("{what} is NULL but count is {count}"),
        ));
    }
    // SAFETY: the caller passes `count` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(items, count) })
}

/// `count` actor ids from a C array of strings, each checked as
/// [`str_arg`] does.
///
/// # Safety
///
/// `ids` must point to `count` pointers, each NULL or NUL-terminated.
pub(crate) unsafe fn ids_arg<'a>(
    ids: *const *const c_char,
    count: usize,
) -> Result<Vec<&'a str>, trebuchet_status> {
    // SAFETY: forwarded.
    let pointers = unsafe { array_arg(ids, count, "actor_ids") }?;
    pointers
        .iter()
        .enumerate()
        // SAFETY: forwarded.
        .map(|(i, &id)| unsafe { str_arg(id, &format!("actor_ids[{i}]")) })
        .collect()
}
