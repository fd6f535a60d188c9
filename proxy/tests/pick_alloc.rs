//! Every balancer's pick is allocation-free: a counting global allocator watches picks for each
//! algorithm at 10 and 1,000 endpoints, including consistent hashing on a header through
//! `Route::pick`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use trellis_proxy::balance::{self, hash_key, EndpointStats, PickContext};

struct Counting;

thread_local! {
    // Per thread: allocations by the test harness's other threads must not count. Const
    // initialization means reading it never allocates.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn allocations() -> usize {
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

#[test]
fn picks_do_not_allocate() {
    // The counter sees allocations on this thread (so a zero below means something).
    let before = allocations();
    std::hint::black_box(vec![1u8; 64]);
    assert!(
        allocations() > before,
        "the counting allocator is not active"
    );

    for n in [10usize, 1000] {
        let stats: Vec<Arc<EndpointStats>> =
            (0..n).map(|_| Arc::new(EndpointStats::new())).collect();
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i % 5) as u32).collect();
        let keys: Vec<u64> = (0..n)
            .map(|i| hash_key(format!("10.0.{}.{}:15006", i / 250, i % 250).as_bytes()))
            .collect();
        let zones: Vec<Option<&str>> = (0..n)
            .map(|i| Some(if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        for algorithm in [
            "round_robin",
            "weighted_round_robin",
            "random",
            "least_request",
            "peak_ewma",
            "consistent_hash",
        ] {
            for zone_aware in [false, true] {
                let hash_on = if algorithm == "consistent_hash" {
                    ", hash_on: {header: x-user}"
                } else {
                    ""
                };
                let yaml = format!("{{algorithm: {algorithm}, zone_aware: {zone_aware}{hash_on}}}");
                let spec: trellis_policies::LoadBalancerSpec =
                    serde_norway::from_str(&yaml).unwrap();
                let b = balance::build(Some(&spec), &stats, &weights, &keys, &zones, Some("a"));
                let ctx = PickContext {
                    hash: Some(hash_key(b"user-1")),
                };
                let before = allocations();
                for _ in 0..1000 {
                    assert!(b.pick(&stats, &ctx).is_some());
                }
                let allocated = allocations() - before;
                assert_eq!(allocated, 0, "{algorithm} (zone_aware {zone_aware}) allocated {allocated} times in 1000 picks of {n}");
            }
        }
    }
}
