//! [`inspect`], offloaded: who holds what on many images.

use std::path::{Path, PathBuf};

use qlock_core::{Error, ImageStatus};

use crate::runtime::Runtime;

/// [`qlock_core::inspect`] on `R`'s blocking pool: probes each image and names the holders and
/// every opener with one walk over `/proc`, locking nothing.
///
/// # Errors
/// One result per path, in order; a path that cannot be opened or probed fails alone, and a
/// failed pool task fails them all with [`Error::Pool`].
pub async fn inspect<R: Runtime, P: AsRef<Path>>(
    paths: impl IntoIterator<Item = P>,
) -> Vec<Result<ImageStatus, Error>> {
    let paths: Vec<PathBuf> = paths.into_iter().map(|p| p.as_ref().to_path_buf()).collect();
    let n = paths.len();
    match R::asyncify(move || Ok(qlock_core::inspect(&paths))).await {
        Ok(all) => all,
        Err(e) => {
            // The one failure, for every path: a pool failure as such, anything else by its text.
            let message = match e {
                Error::Pool { message } => message,
                e => e.to_string(),
            };
            (0..n).map(|_| Err(Error::Pool { message: message.clone() })).collect()
        }
    }
}
