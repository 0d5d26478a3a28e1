//! A section of the compat run beside the single-image matrix: its printed table and its
//! checks, which count in `compat: N/N agree` like the matrix's own ([`crate::compat::Report`]).

use std::sync::Mutex;

use crate::compat::Check;

/// One section's outcome for one QEMU build.
#[derive(Debug)]
pub struct Section {
    /// The rendered tables and disagreements, printed after the matrix.
    pub text: String,
    /// Every pair compared (and every holder start), in order.
    pub checks: Vec<Check>,
}

impl Section {
    /// `chains: N/N agree`, for the section's own line in the report.
    pub fn summary(&self, name: &str) -> String {
        let ok = self.checks.iter().filter(|c| c.ok).count();
        format!("{name}: {ok}/{} agree", self.checks.len())
    }
}

/// Whether the `--only` filters select `label` of a section whose labels all start with the
/// section's name (`chain qcow2-3`, `153 qemu-io -r`): no filters, or a filter that `label`
/// starts with. Filters meant for the single-image matrix never start with a section's name.
pub fn selected(only: &[String], label: &str) -> bool {
    only.is_empty() || only.iter().any(|o| label.starts_with(o.as_str()))
}

/// `f(0..n)` on `jobs` threads, results in order.
pub fn par_map<T: Send>(jobs: usize, n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = Mutex::new(0usize);
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            scope.spawn(|| {
                loop {
                    let i = {
                        let mut next = next.lock().unwrap_or_else(|e| e.into_inner());
                        let i = *next;
                        *next += 1;
                        i
                    };
                    if i >= n {
                        break;
                    }
                    let r = f(i);
                    out.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                }
            });
        }
    });
    out.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().flatten().collect()
}
