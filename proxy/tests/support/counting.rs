//! A counting global allocator for allocation tests (`#[path]`-included by each test binary,
//! which gets its own copy of the allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

thread_local! {
    // Per thread: allocations by the test harness's other threads must not count. Const
    // initialization means reading it never allocates.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

/// Buckets for allocations made on whole groups of threads (a runtime's workers).
const BUCKETS: usize = 4;
static BUCKET_COUNTS: [AtomicUsize; BUCKETS] = [const { AtomicUsize::new(0) }; BUCKETS];

thread_local! {
    // The bucket this thread's allocations also count into (none by default).
    static BUCKET: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Count every later allocation of the calling thread into `bucket` too (for a tokio
/// runtime's `on_thread_start`, so that one runtime's threads make one figure).
#[allow(dead_code)]
pub fn count_thread_into(bucket: usize) {
    assert!(bucket < BUCKETS, "bucket {bucket} out of range");
    BUCKET.with(|b| b.set(bucket));
}

/// Allocations counted into `bucket` so far, by all its threads.
#[allow(dead_code)]
pub fn bucket(bucket: usize) -> usize {
    BUCKET_COUNTS[bucket].load(Ordering::Relaxed)
}

pub fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: forwards every call unchanged to the system allocator, which upholds the GlobalAlloc
// contract; the only additions are a thread-local counter increment and an atomic one (const-initialized, so it
// never allocates or recurses), which cannot affect memory safety.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        let _ = BUCKET.try_with(|b| {
            if let Some(n) = BUCKET_COUNTS.get(b.get()) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes through `alloc` above).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Panics unless the counter sees allocations on this thread (so a zero means something).
pub fn assert_active() {
    let before = allocations();
    std::hint::black_box(vec![1u8; 64]);
    assert!(
        allocations() > before,
        "the counting allocator is not active"
    );
}
