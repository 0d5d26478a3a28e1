//! A section of the compat run beside the single-image matrix: its printed table and its
//! pairs, which count in `compat: N/N agree` like the matrix's own ([`crate::compat::Report`]).

use std::sync::Mutex;

use crate::compat::Pair;

/// One section's outcome for one QEMU build.
#[derive(Debug)]
pub struct Section {
    /// `chains`, `qemu-iotests 153`: its name in the summary.
    pub name: &'static str,
    /// The rendered tables and disagreements, printed after the matrix.
    pub text: String,
    /// Every pair compared (and every holder start), in order.
    pub pairs: Vec<Pair>,
}

impl Section {
    /// An empty section.
    pub fn new(name: &'static str) -> Section {
        Section { name, text: String::new(), pairs: Vec::new() }
    }

    /// `chains 610/610`: how many of its pairs agree.
    pub fn tally(&self) -> String {
        let ok = self.pairs.iter().filter(|c| c.ok).count();
        format!("{} {ok}/{}", self.name, self.pairs.len())
    }

    /// Ends the text with `chains: 610/610 agree (QEMU ...)`, when anything ran.
    pub fn close(&mut self, build: &str) {
        if !self.pairs.is_empty() {
            let ok = self.pairs.iter().filter(|c| c.ok).count();
            let line = format!("{}: {ok}/{} agree (QEMU {build})\n\n", self.name, self.pairs.len());
            self.text.push_str(&line);
        }
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
