//! rstest fixtures: temporary images and holders on them.
//!
//! Import them with `use qlock_testkit::fixtures::*;` and name them as test arguments. Each
//! image lives in its own temporary directory, removed on drop; a [`HeldImage`] drops its
//! holder before its image. Fixtures panic with a clear message when the machine cannot
//! provide them, as a failed test setup should.
//!
//! ```
//! use qlock_testkit::fixtures::{TempImage, raw_image};
//! use rstest::rstest;
//!
//! #[rstest]
//! fn starts_empty(raw_image: TempImage) {
//!     assert_eq!(std::fs::metadata(raw_image.path()).unwrap().len(), 1 << 20);
//! }
//! # fn main() {}
//! ```

use rstest::fixture;

use crate::front_end::{Format, FrontEnd};
use crate::holder::FakeQemu;
pub use crate::image::{IMAGE_SIZE, TempImage};

/// An image with a holder on it. The holder is dropped (killed and reaped) before the image.
#[derive(Debug)]
pub struct HeldImage {
    /// The holder.
    pub holder: FakeQemu,
    /// The image.
    pub image: TempImage,
}

/// Spawns a fake `front_end` on `image`, panicking with the reason if it cannot.
pub fn hold(image: TempImage, front_end: FrontEnd) -> HeldImage {
    let holder = FakeQemu::builder(image.path())
        .front_end(front_end, image.format())
        .spawn()
        .unwrap_or_else(|e| panic!("fixture: cannot spawn {front_end} on {}: {e}", image.path().display()));
    HeldImage { holder, image }
}

/// A fresh 1 MiB raw image.
#[fixture]
pub fn raw_image() -> TempImage {
    TempImage::new(Format::Raw).unwrap_or_else(|e| panic!("fixture: cannot create a raw image: {e}"))
}

/// A fresh 1 MiB qcow2 image, from `qemu-img create` when it is on `PATH`.
#[fixture]
pub fn qcow2_image() -> TempImage {
    TempImage::new(Format::Qcow2).unwrap_or_else(|e| panic!("fixture: cannot create a qcow2 image: {e}"))
}

/// A qcow2 image held by a fake VM disk (`100 101 103 | 201 203`).
#[fixture]
pub fn vm_on_qcow2(qcow2_image: TempImage) -> HeldImage {
    hold(qcow2_image, FrontEnd::VmDisk)
}

/// A raw image held by a fake VM disk (`100 101 | 201`).
#[fixture]
pub fn vm_on_raw(raw_image: TempImage) -> HeldImage {
    hold(raw_image, FrontEnd::VmDisk)
}
