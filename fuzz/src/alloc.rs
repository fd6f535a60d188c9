//! A counting global allocator: live and peak bytes per thread, so the driver can check that
//! one input never makes a target allocate more than its bound, and a hard cap on any single
//! allocation that saves the input before the process would die of it.
//!
//! A binary opts in with `#[global_allocator] static A: trellis_fuzz::alloc::Counting =
//! trellis_fuzz::alloc::Counting;` (the fuzz driver and the short-pass tests do); without it
//! the driver simply skips the allocation check.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest single allocation a target may ask for. Nothing parsed from one bounded input
/// (64 KiB at most) has a reason to need this much at once.
pub const MAX_SINGLE_ALLOC: usize = 256 << 20;

static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// Set while the thread runs a target: only then does the single-allocation cap apply.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Counts bytes per thread on top of the system allocator.
pub struct Counting;

fn add(bytes: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + bytes;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

fn check(size: usize) {
    if size > MAX_SINGLE_ALLOC && GUARDED.try_with(Cell::get).unwrap_or(false) {
        let _ = GUARDED.try_with(|g| g.set(false));
        crate::driver::fatal(&format!(
            "single allocation of {size} bytes (cap {MAX_SINGLE_ALLOC})"
        ));
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping touches only
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        check(layout.size());
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        check(layout.size());
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Whether the counting allocator is the global one in this process.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Start measuring on this thread: the peak is reset to the bytes live now.
pub fn start() -> isize {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live));
    GUARDED.with(|g| g.set(true));
    live
}

/// Stop measuring: the most bytes live above `base` since [`start`].
pub fn stop(base: isize) -> usize {
    GUARDED.with(|g| g.set(false));
    (PEAK.with(Cell::get) - base).max(0) as usize
}
