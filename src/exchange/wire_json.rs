//! One pass from a frame's bytes into a borrowed wire struct, with simd-json's scratch
//! space (aligned input copy, string buffer, structural indexes) kept per worker thread:
//! allocating it for every frame showed in the profile. What the struct borrows, it
//! borrows from the frame (simd-json unescapes in place), never from the scratch.
//!
//! Shared by the adapters' fast paths; it knows no venue.

use std::cell::RefCell;

use serde::Deserialize;

thread_local! {
    static SCRATCH: RefCell<simd_json::Buffers> = RefCell::new(simd_json::Buffers::new(4096));
}

/// `T` from `frame`, in one pass.
pub(crate) fn from_slice<'a, T: Deserialize<'a>>(
    frame: &'a mut [u8],
) -> Result<T, simd_json::Error> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        simd_json::serde::from_slice_with_buffers::<T>(frame, &mut scratch)
    })
}
