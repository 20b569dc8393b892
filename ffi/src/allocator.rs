//! The library's global allocator (feature `mimalloc`): mimalloc, or the
//! host's `malloc` when the process runs with `LLMPROXY_ALLOCATOR=system`.
//!
//! The choice is made once, at the library's first Rust allocation, and
//! never changes, so every block is freed by the allocator that made it.
//! `system` is for memory tools that watch `malloc` (valgrind, heaptrack):
//! mimalloc maps its own pages, which they do not see. One build serves
//! both (docs/adr/061-one-build-two-allocators.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// The environment variable that picks the allocator.
pub const ENV: &CStr = c"LLMPROXY_ALLOCATOR";

const UNDECIDED: u8 = 0;
const MIMALLOC: u8 = 1;
const SYSTEM: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// mimalloc unless `LLMPROXY_ALLOCATOR=system`; see the module doc.
pub struct Allocator;

/// Which allocator `value` of [`ENV`] picks (`None`: unset).
fn choice_for(value: Option<&[u8]>) -> u8 {
    match value {
        Some(b"system") => SYSTEM,
        _ => MIMALLOC,
    }
}

/// Whether allocations go to mimalloc: one load and compare on the hot
/// path; everything else is out of line ([`decide`], the system path).
#[inline(always)]
fn mimalloc() -> bool {
    CHOICE.load(Ordering::Relaxed) == MIMALLOC
}

/// Whether allocations go to the host's `malloc` (deciding first if no
/// allocation has yet).
#[cold]
#[inline(never)]
fn system() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        MIMALLOC => false,
        SYSTEM => true,
        _ => decide(),
    }
}

/// Read [`ENV`] once; the first thread to decide wins, so threads racing
/// through the first allocation agree.
fn decide() -> bool {
    // SAFETY: the name is NUL-terminated; `getenv` allocates nothing (an
    // allocation here would recurse into this allocator) and the bytes it
    // points to are read before this returns. `CStr::from_ptr` reads up to
    // the value's NUL terminator.
    let value = unsafe {
        let p = libc::getenv(ENV.as_ptr());
        (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes())
    };
    let want = choice_for(value);
    match CHOICE.compare_exchange(UNDECIDED, want, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => want == SYSTEM,
        Err(chosen) => chosen == SYSTEM,
    }
}

/// The slow side of each method: the system allocator, or mimalloc when
/// this is the first allocation and it picks mimalloc.
#[cold]
#[inline(never)]
unsafe fn alloc_slow(layout: Layout, zeroed: bool) -> *mut u8 {
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        match (system(), zeroed) {
            (true, false) => System.alloc(layout),
            (true, true) => System.alloc_zeroed(layout),
            (false, false) => MiMalloc.alloc(layout),
            (false, true) => MiMalloc.alloc_zeroed(layout),
        }
    }
}

/// The allocator in use, as `llmproxy.allocator` shows it: `"mimalloc"`
/// or `"system"`.
pub fn name() -> &'static str {
    if system() {
        "system"
    } else {
        "mimalloc"
    }
}

// SAFETY: every method forwards to one of two allocators that implement
// `GlobalAlloc` soundly, and the choice is the same for the whole life of
// the process (`CHOICE` is set once, before the first allocation returns;
// a block to free or grow exists, so it was set), so `dealloc` and
// `realloc` reach the allocator that made the block.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        unsafe {
            if mimalloc() {
                MiMalloc.alloc(layout)
            } else {
                alloc_slow(layout, false)
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        unsafe {
            if mimalloc() {
                MiMalloc.alloc_zeroed(layout)
            } else {
                alloc_slow(layout, true)
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded to the allocator that
        // made `ptr` (see the impl's SAFETY note).
        unsafe {
            if mimalloc() {
                MiMalloc.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        unsafe {
            if mimalloc() {
                MiMalloc.realloc(ptr, layout, new_size)
            } else {
                System.realloc(ptr, layout, new_size)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_system_picks_the_host_malloc() {
        let cases: &[(Option<&[u8]>, u8)] = &[
            (None, MIMALLOC),
            (Some(b"system"), SYSTEM),
            (Some(b""), MIMALLOC),
            (Some(b"mimalloc"), MIMALLOC),
            (Some(b"System"), MIMALLOC),
            (Some(b"system "), MIMALLOC),
        ];
        for (value, want) in cases {
            assert_eq!(choice_for(*value), *want, "{:?}", value.map(String::from_utf8_lossy));
        }
    }

    #[test]
    fn the_choice_is_made_once() {
        let first = name();
        assert_eq!(name(), first);
        assert_ne!(CHOICE.load(Ordering::Relaxed), UNDECIDED);
    }
}
