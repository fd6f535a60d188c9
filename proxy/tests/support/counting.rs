//! A counting global allocator for allocation tests (`#[path]`-included by each test binary,
//! which gets its own copy of the allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    // Per thread: allocations by the test harness's other threads must not count. Const
    // initialization means reading it never allocates.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

pub fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: forwards every call unchanged to the system allocator, which upholds the GlobalAlloc
// contract; the only addition is a thread-local counter increment (const-initialized, so it
// never allocates or recurses), which cannot affect memory safety.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
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
