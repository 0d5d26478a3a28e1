//! Inspection, offloaded: who holds what on many images.

use std::path::Path;

use qlock_core::{Error, ImageStatus};

use crate::AsyncStd;

/// [`qlock_core::inspect`] on the `blocking` pool: probes each image and names the holders with
/// one walk over `/proc`, locking nothing.
///
/// ```
/// use qlock_core::Access;
/// # fn main() -> Result<(), qlock_core::Error> { smol::block_on(async {
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("disk.img");
/// # std::fs::write(&path, b"").unwrap();
/// let _vm = qlock_async_std::ImageLock::acquire(&path, Access::WRITE).await?;
/// let status = qlock_async_std::inspect([&path]).await.remove(0)?;
/// assert_eq!(status.holders[0].pid, std::process::id());
/// # Ok(())
/// # }) }
/// ```
///
/// # Errors
/// One result per path, in order; a path that cannot be opened or probed fails alone, and a
/// failed pool task fails them all with [`Error::Pool`].
pub async fn inspect<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Vec<Result<ImageStatus, Error>> {
    qlock_async::inspect::<AsyncStd, P>(paths).await
}
