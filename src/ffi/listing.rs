//! Listing actor ids page by page, and counting them.

use super::*;

/// One page of actor ids from `trebuchet_store_list_ids`: read it with
/// `trebuchet_id_page_count`, `trebuchet_id_page_get` and
/// `trebuchet_id_page_next`; release it with `trebuchet_id_page_free`.
/// Immutable, so it may be read from several threads.
pub struct trebuchet_id_page {
    _private: [u8; 0],
}

/// What a `trebuchet_id_page` holds: ids without interior NULs (actor ids
/// never have one) and the next page's token.
struct IdPage {
    ids: Vec<CString>,
    next: Option<CString>,
}

/// A string the library made, as a C string. Ids and page tokens never
/// hold a NUL; one that did would be a bug, reported as a panic.
fn c_string(s: String) -> CString {
    CString::new(s).expect("actor ids and page tokens hold no NUL")
}

/// One page of the ids that start with `prefix` (NULL or `""` for all), in
/// the table's key order, at most `limit` of them. `page_token` is NULL for
/// the first page, then the token `trebuchet_id_page_next` gave for the
/// page before (the last id of that page), with the same prefix. An id that exists from the first
/// page to the last is listed exactly once, however the table changes in
/// between; expired actors are not listed.
///
/// `TREBUCHET_INVALID_ARGUMENT` when `limit` is 0 (nothing is sent to the
/// server). On
/// success `*page_out` is a new page; release it with
/// `trebuchet_id_page_free`.
///
/// # Safety
///
/// `prefix` and `page_token` NULL or NUL-terminated; `page_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_list_ids(
    store: *const trebuchet_store,
    prefix: *const c_char,
    page_token: *const c_char,
    limit: u32,
    page_out: *mut *mut trebuchet_id_page,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let prefix = unsafe { opt_str_arg(prefix, "prefix") }?.unwrap_or("");
        let token = unsafe { opt_str_arg(page_token, "page_token") }?;
        out_arg(page_out, "page_out")?;
        if limit == 0 {
            return Err(fail(
                TREBUCHET_INVALID_ARGUMENT,
                "limit is 0: a page holds at least 1 id",
            ));
        }
        let page = check(store.list_actors(prefix, token, limit))?;
        let page = IdPage {
            ids: page
                .actors
                .into_iter()
                .map(|a| c_string(a.actor_id))
                .collect(),
            next: page.next.map(c_string),
        };
        // SAFETY: checked non-NULL.
        unsafe { page_out.write(into_handle(Kind::IdPage, page)) };
        Ok(TREBUCHET_OK)
    })
}

/// # Safety
///
/// `page` must be NULL or a live handle.
unsafe fn page_arg<'a>(page: *const trebuchet_id_page) -> Result<&'a IdPage, trebuchet_status> {
    // SAFETY: forwarded.
    unsafe { borrow::<IdPage, _>(page, Kind::IdPage, "page") }
}

/// How many ids the page holds (0 only when nothing matched).
///
/// # Safety
///
/// `page` NULL or live; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_id_page_count(
    page: *const trebuchet_id_page,
    count_out: *mut usize,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let page = unsafe { page_arg(page) }?;
        out_arg(count_out, "count_out")?;
        // SAFETY: checked non-NULL.
        unsafe { count_out.write(page.ids.len()) };
        Ok(TREBUCHET_OK)
    })
}

/// Points `*id_out` at the page's id number `index` (from 0), NUL-terminated
/// UTF-8 valid until the page is freed; `len_out`, when not NULL, receives
/// its length in bytes without the NUL. `TREBUCHET_INVALID_ARGUMENT` when
/// `index` is not below the count.
///
/// # Safety
///
/// `page` NULL or live; `id_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_id_page_get(
    page: *const trebuchet_id_page,
    index: usize,
    id_out: *mut *const c_char,
    len_out: *mut usize,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let page = unsafe { page_arg(page) }?;
        out_arg(id_out, "id_out")?;
        let Some(id) = page.ids.get(index) else {
            return Err(fail(
                TREBUCHET_INVALID_ARGUMENT,
                format!("index {index} is past the page's {} ids", page.ids.len()),
            ));
        };
        // SAFETY: checked non-NULL; `len_out` NULL or writable.
        unsafe {
            id_out.write(id.as_ptr());
            write_opt(len_out, id.as_bytes().len());
        }
        Ok(TREBUCHET_OK)
    })
}

/// Points `*token_out` at the token of the next page, NUL-terminated and
/// valid until the page is freed, or sets it to NULL on the last page. The
/// token holds the place, not a cursor on the server: copy it to keep it
/// past the page, hand it to another process, or use it much later.
///
/// # Safety
///
/// `page` NULL or live; `token_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_id_page_next(
    page: *const trebuchet_id_page,
    token_out: *mut *const c_char,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded.
        let page = unsafe { page_arg(page) }?;
        out_arg(token_out, "token_out")?;
        let token = page.next.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
        // SAFETY: checked non-NULL.
        unsafe { token_out.write(token) };
        Ok(TREBUCHET_OK)
    })
}

/// Frees a page and sets `*page` to NULL, so a second call on the same
/// variable does nothing. NULL and a pointer to NULL are fine.
///
/// # Safety
///
/// `page` NULL or the address of a page pointer.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_id_page_free(page: *mut *mut trebuchet_id_page) {
    boundary(|| {
        // SAFETY: forwarded.
        drop(unsafe { take::<IdPage, _>(page, Kind::IdPage) });
        TREBUCHET_OK
    });
}

/// How many actors have an id starting with `prefix` (NULL or `""` for
/// all); expired actors are not counted. Counts every row: on a large table
/// this takes a while.
///
/// # Safety
///
/// `prefix` NULL or NUL-terminated; `count_out` writable.
#[no_mangle]
pub unsafe extern "C" fn trebuchet_store_count_actors(
    store: *const trebuchet_store,
    prefix: *const c_char,
    count_out: *mut u64,
) -> trebuchet_status {
    run(|| {
        // SAFETY: forwarded from the caller's guarantees.
        let store = unsafe { store_arg(store) }?;
        let prefix = unsafe { opt_str_arg(prefix, "prefix") }?.unwrap_or("");
        out_arg(count_out, "count_out")?;
        let count = check(store.count_actors(prefix))?;
        // SAFETY: checked non-NULL.
        unsafe { count_out.write(count) };
        Ok(TREBUCHET_OK)
    })
}
