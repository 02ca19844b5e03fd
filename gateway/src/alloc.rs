//! How the gateway's allocator holds memory, which decides most of what an
//! idle session costs.
//!
//! mimalloc is built without transparent huge pages (`no_thp`): a heap of
//! many small, long-lived session objects would otherwise be backed by 2 MiB
//! pages that count as resident in full (measured here: 2,682 against 1,455
//! bytes per idle connection). And it is told to return freed pages to the
//! OS at once instead of after a delay: the delayed purge only runs when
//! the owning thread allocates again, which a core with idle sessions
//! rarely does, so memory freed after a burst stayed resident.

/// mimalloc's `mi_option_purge_delay`, as numbered in its `mimalloc.h`
/// (the same in its v2 and v3 headers). libmimalloc-sys exports no
/// constant for it.
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets the allocator's options. Call once at the start of `main`, before
/// any other thread exists. `MIMALLOC_PURGE_DELAY` in the environment wins.
pub fn configure() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set is not thread-safe; it runs here before the
        // process starts any thread, and takes no pointers.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

/// Purges memory the current thread's heap has freed but kept. Each core
/// calls it from its once-a-second sweep.
pub fn collect() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: mi_collect only walks the calling thread's own heap; it takes
    // no pointers and is safe to call at any time from any thread.
    unsafe {
        libmimalloc_sys::mi_collect(false);
    }
}
