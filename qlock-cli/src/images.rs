//! One image under many names: `disk.img`, `./disk.img`, a symlink and a hard link are one
//! file, identified by (device, inode) as the kernel's locks are.
//!
//! qlock takes each file once: a second descriptor of the same file would conflict with the
//! first (OFD locks belong to the description, not the process), so `check disk.img disk.img`
//! would refuse itself and `wait` would wait forever. Under POSIX locks a second descriptor
//! would even drop the first's locks when closed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The names given on the command line, grouped by the file they name.
pub(crate) struct Names<'a> {
    /// The first name of each distinct file, in the order given.
    distinct: Vec<&'a Path>,
    /// For each name given, the index of its file in `distinct`.
    file_of: Vec<usize>,
}

impl<'a> Names<'a> {
    /// Groups `names` by `stat` (which follows symlinks, as opening does). A name that cannot
    /// be stat-ed is a file of its own: opening it reports the error.
    pub(crate) fn of(names: &'a [PathBuf]) -> Names<'a> {
        let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
        let mut distinct = Vec::new();
        let mut file_of = Vec::with_capacity(names.len());
        for name in names {
            let key = std::fs::metadata(name).ok().map(|md| (md.dev(), md.ino()));
            let index = match key.and_then(|k| seen.get(&k)) {
                Some(&i) => i,
                None => {
                    distinct.push(name.as_path());
                    if let Some(k) = key {
                        seen.insert(k, distinct.len() - 1);
                    }
                    distinct.len() - 1
                }
            };
            file_of.push(index);
        }
        Names { distinct, file_of }
    }

    /// Each file once, by its first name.
    pub(crate) fn distinct(&self) -> &[&'a Path] {
        &self.distinct
    }

    /// For each name given, in order, the index of its file in [`Names::distinct`].
    pub(crate) fn files(&self) -> impl Iterator<Item = usize> + '_ {
        self.file_of.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_one_file_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        std::os::unix::fs::symlink(&a, dir.path().join("link")).unwrap();
        let given = vec![
            a.clone(),
            b.clone(),
            dir.path().join("./a.img"),
            dir.path().join("link"),
            dir.path().join("missing"),
            dir.path().join("missing"),
        ];
        let names = Names::of(&given);
        assert_eq!(names.distinct(), [a.as_path(), b.as_path(), given[4].as_path(), given[5].as_path()]);
        assert_eq!(names.files().collect::<Vec<_>>(), [0, 1, 0, 0, 2, 3]);
    }
}
