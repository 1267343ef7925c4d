//! The C library of `trebuchet-postgres`: links the `ffi` module, whose
//! `#[no_mangle]` functions become the exported symbols of
//! `libtrebuchet_postgres_c.so` and `libtrebuchet_postgres_c.a`. The header
//! is `ffi/include/trebuchet_postgres.h`.
#![forbid(unsafe_code)]

pub use trebuchet_postgres::ffi::*;
