//! How the process's C allocator treats the engine's activations.
//!
//! libtorch allocates every activation with the C library's `malloc` (64-byte aligned), and a
//! forward pass frees what the previous one allocated. With glibc's defaults, chunks above
//! the mmap threshold get pages of their own, and a heap whose free top grows past the trim
//! threshold hands it back to the kernel; both thresholds follow the largest chunk freed so
//! far (trim = 2 × mmap), so a ResNet-50 forward at batch 8 — ~26 MB activations, well over
//! 50 MB freed at its end — returns its pages at the end of every forward and faults them in
//! again, zeroed, in the next: ~12,500 page faults and ~25 ms of kernel CPU time per forward on
//! the 2-core dev VM (docs/benchmarks.md, "A Zen 5 host, and freed activations kept").
//!
//! [`retain_freed_memory`] fixes that: no chunk gets pages of its own (a zero limit on
//! mmapped chunks, since glibc caps the mmap threshold at 32 MiB and a ResNet-50 activation
//! at batch ≥ 11 is larger), and freed memory stays with the process until the free top of
//! the heap exceeds [`TRIM_THRESHOLD`]. It also makes every thread allocate from the one main
//! arena: a thread of its own arena (the server's engine threads) carves chunks out of 64 MiB
//! heaps and unmaps a heap as soon as all of it is free, whatever the trim threshold, so the
//! same page faults came back there. Arena contention is no concern at the core counts sluice
//! runs on: small chunks come from per-thread caches, large ones are a few per forward.
//!
//! The resident set then stays at the largest forward's working set instead of dropping
//! between requests; it does not grow past it, since the next forward reuses the same
//! chunks. Where the heap cannot grow in place, glibc still extends it with fresh mappings,
//! so an allocation does not fail for want of contiguous address space.

/// Free memory at a heap's top beyond this goes back to the kernel.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// Whether the process's allocator could be told (false off glibc, or when glibc refused).
/// Every chunk then comes from the main arena's heap, and up to [`TRIM_THRESHOLD`] of free
/// memory at its top stays mapped.
/// Call once, first thing in `main`: a thread that has already allocated keeps its arena.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let as_int = |v: usize| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets the allocator's parameters; it returns 0 when it rejects
        // one and touches no memory of ours.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, as_int(TRIM_THRESHOLD)) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
