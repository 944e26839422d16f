//! The process's allocator: mimalloc (glibc's malloc and free were about a tenth of the proxy's CPU time under
//! load, measured with `perf`), counting per thread the bytes allocated and not yet freed there. A script call
//! reads the count to stay within its memory budget (`script::engine`); keeping it costs one thread-local add per
//! allocation.
//!
//! The only unsafe code in keyrelay: implementing `GlobalAlloc` is unsafe by definition. Each method forwards to
//! mimalloc with the caller's own arguments, so it upholds exactly the contract its caller promised.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

pub struct Counting;

#[global_allocator]
static GLOBAL: Counting = Counting;

thread_local! {
    /// Bytes allocated minus bytes freed by this thread (memory freed here that another thread allocated makes it
    /// smaller, so it never overstates what this thread holds).
    static NET: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: isize) {
    // During thread teardown the slot may be gone; the count then no longer matters.
    let _ = NET.try_with(|net| net.set(net.get().wrapping_add(bytes)));
}

/// Bytes this thread has allocated and not freed so far; compare two readings to know what happened between.
pub fn thread_net() -> isize {
    NET.try_with(Cell::get).unwrap_or(0)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        // SAFETY: `ptr` was allocated by this allocator (mimalloc) with `layout`, as the caller guarantees.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        // SAFETY: as for `dealloc`, and `new_size` is valid for `layout`'s alignment, as the caller guarantees.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_what_this_thread_holds() {
        let before = super::thread_net();
        let held = vec![0u8; 1 << 20];
        let during = super::thread_net();
        drop(held);
        let after = super::thread_net();
        assert!(during - before >= 1 << 20);
        assert!(after - before < 1 << 10);
    }
}
