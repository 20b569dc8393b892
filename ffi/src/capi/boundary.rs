//! The panic boundary and argument readers every `extern "C"` body uses.
//!
//! A Rust panic must never unwind into C (that is undefined behaviour, and
//! since Rust 1.81 an abort). [`call`] runs a fallible body under
//! `catch_unwind`, turns its outcome into an [`llmp_result`] and, on
//! failure, hands the caller an error object; [`call_or`] does the same for
//! the infallible accessors and `_free` functions, returning a fallback.

use std::any::Any;
use std::ffi::{c_char, CStr};
use std::panic::{self, AssertUnwindSafe};

use super::error::{llmp_error, llmp_result, Failure};

/// Run a fallible body at the C boundary. `Ok` is `LLMP_OK`; a failure or
/// a panic becomes its code, and, when `err` is not NULL, `*err` receives a
/// new error object the caller frees with `llmp_error_free`.
///
/// # Safety
/// `err` is NULL or valid for writing one pointer.
pub unsafe fn call(err: *mut *mut llmp_error, body: impl FnOnce() -> Result<(), Failure>) -> llmp_result {
    let outcome = panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| Err(from_panic(payload)));
    match outcome {
        Ok(()) => llmp_result::LLMP_OK,
        Err(failure) => {
            let code = failure.code;
            if !err.is_null() {
                let boxed = Box::into_raw(Box::new(llmp_error::from(failure)));
                // SAFETY: `err` is not NULL and valid for writing one
                // pointer (this function's contract).
                unsafe { err.write(boxed) };
            }
            code
        }
    }
}

/// Run an infallible body at the C boundary; a panic returns `fallback`.
pub fn call_or<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The failure a caught panic becomes.
pub fn from_panic(payload: Box<dyn Any + Send>) -> Failure {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| String::from("unknown panic payload"));
    Failure::new(
        llmp_result::LLMP_PANIC,
        format!("panic: internal error in libllmproxy: {what}"),
    )
}

/// `LLMP_INVALID_ARGUMENT` unless `p` is not NULL.
pub fn non_null<T>(p: *const T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        Err(Failure::invalid(format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// A NUL-terminated UTF-8 argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and
/// unchanged for `'a`.
pub unsafe fn utf8_cstr<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    non_null(p, what)?;
    // SAFETY: `p` is not NULL and NUL-terminated (the caller's contract).
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    std::str::from_utf8(bytes)
        .map_err(|e| Failure::invalid(format!("{what} is not valid UTF-8 (byte {})", e.valid_up_to())))
}

/// A NUL-terminated argument as bytes (paths need not be UTF-8).
///
/// # Safety
/// As for [`utf8_cstr`].
pub unsafe fn cstr_bytes<'a>(p: *const c_char, what: &str) -> Result<&'a [u8], Failure> {
    non_null(p, what)?;
    // SAFETY: `p` is not NULL and NUL-terminated (the caller's contract).
    Ok(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// A `(pointer, length)` argument as bytes. The text need not be
/// NUL-terminated; `len` bytes are read.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that stay valid and
/// unchanged for `'a`.
pub unsafe fn byte_slice<'a>(p: *const c_char, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    non_null(p, what)?;
    if len > isize::MAX as usize {
        return Err(Failure::invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: `p` is not NULL, `len` fits in `isize`, and `len` bytes from
    // `p` are readable for `'a` (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}
