//! The image graph on the command line: `--chain` for `run`, `check` and `wait`, `check --op`,
//! and `status --chain`.
//!
//! `--chain` is not the default: the file named is locked alone unless asked, as before, so a
//! script locking a vmdk or a raw file never meets a chain error, and a preset keeps meaning
//! the bytes on the file it names. With `--chain`, every node of a qcow2 image's graph (its
//! backing files and external data files) is locked as the `qemu-io` front end the preset is
//! named after locks it (`qlock_core::graph::rules::User::for_access`); `--no-chain` (the
//! default) locks the file alone. Graphs qlock does not follow (`json:` and protocol names,
//! other formats, loops) exit 2 with a message that says to use `--no-chain`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qlock_core::graph::op;
use qlock_core::graph::{Chain, Format, Node, Role};
use qlock_core::graph::{ChainError, ChainLock};
use qlock_core::{CloseWatch, sleep_or_close};
use qlock_core::{Holder, ImageLock, ImageStatus, LockOptions, inspect};
use qlock_core::{Retry, retry_blocking};
use serde_json::{Value, json};

use crate::cli::{CheckArgs, HoldArgs, StatusArgs};
use crate::images::Names;
use crate::{EXIT_CONFLICT, EXIT_ERROR, Failure, Outcome, message, say, status};

/// A chain refusal, with the top it was asked on: `Could not open 'TOP': ...` as QEMU says.
struct Refusal {
    top: PathBuf,
    error: ChainError,
}

impl Refusal {
    fn text(&self) -> String {
        let open = |e: &ChainError| format!("Could not open '{}': {e}", self.top.display());
        match &self.error {
            ChainError::Node { .. } => open(&self.error),
            ChainError::TimedOut { waited, last } => {
                format!("Timed out after {:.1}s: {}", waited.as_secs_f64(), open(last))
            }
            other => other.to_string(),
        }
    }

    fn failure(self, conflict: u8) -> Failure {
        let code = if self.error.conflict().is_some() { conflict } else { EXIT_ERROR };
        Failure::Said { text: self.text(), hint: self.error.hint(), code }
    }
}

impl Retry for Refusal {
    fn is_retryable(&self) -> bool {
        self.error.is_retryable()
    }

    fn timed_out(self, waited: Duration) -> Refusal {
        Refusal { top: self.top, error: self.error.timed_out(waited) }
    }
}

/// Takes the access on the whole graph of every image, all or none (one attempt, or waiting
/// with `waiting`); the nodes' guards come back as plain image guards, tops first.
pub(crate) fn take(
    args: &HoldArgs,
    waiting: Option<qlock_core::Backoff>,
    conflict: u8,
) -> Result<Vec<ImageLock>, Failure> {
    let access = args.access.access();
    let options = args.lock.options();
    let names = Names::of(&args.images);
    let attempt = |opts: &LockOptions| -> Result<Vec<ChainLock>, Refusal> {
        let mut held: Vec<ChainLock> = Vec::new();
        for image in names.distinct() {
            match ChainLock::acquire(image, access, opts) {
                Ok(lock) => held.push(lock),
                Err(error) => {
                    // Every node of every image taken so far, released before the answer.
                    held.into_iter().for_each(|l| drop(l.release()));
                    return Err(Refusal { top: image.to_path_buf(), error });
                }
            }
        }
        Ok(held)
    };
    let result = match waiting {
        None => attempt(&options),
        Some(backoff) => {
            let quiet = options.clone().with_find_holders(false);
            let mut watches: Option<Vec<CloseWatch>> = None;
            let waited = retry_blocking(
                &backoff,
                || attempt(&quiet),
                |d| {
                    let w = watches.get_or_insert_with(|| {
                        names.distinct().iter().filter_map(|p| CloseWatch::new(p).ok()).collect()
                    });
                    sleep_or_close(w, d);
                },
            );
            match waited {
                // Name the holders once, at the end: one more attempt with the scan on.
                Err(Refusal { error: ChainError::TimedOut { waited, .. }, .. }) if options.find_holders => {
                    match attempt(&options) {
                        Ok(locks) => Ok(locks),
                        Err(again) if again.error.conflict().is_some() => Err(Refusal {
                            top: again.top,
                            error: ChainError::TimedOut { waited, last: Box::new(again.error) },
                        }),
                        Err(other) => Err(other),
                    }
                }
                other => other,
            }
        }
    };
    let locks = result.map_err(|r| r.failure(conflict))?;
    Ok(locks.into_iter().flat_map(ChainLock::into_images).collect())
}

/// `qlock check IMAGE --op NAME [-U]`: what `qemu-img NAME` would be told about locks on
/// IMAGE's graph now. Exit 0 past locking, 1 with `qemu-img`'s message, 2 when the question
/// has no answer.
pub(crate) fn check_op(args: &CheckArgs, op: op::Op, out: &mut impl Write) -> Result<Outcome, Failure> {
    let options = args.hold.lock.options();
    let format = args.format.unwrap_or(Format::Raw);
    for image in Names::of(&args.hold.images).distinct() {
        match op::check(image, op, args.force_share, format, &options) {
            Ok(()) => {}
            Err(e) => {
                let code = if e.conflict().is_some() { EXIT_CONFLICT } else { EXIT_ERROR };
                return Err(Failure::Said { text: e.to_string(), hint: e.hint(), code });
            }
        }
        let u = if args.force_share { " -U" } else { "" };
        writeln!(out, "free: {} (qemu-img {op}{u})", image.display()).map_err(Failure::Output)?;
    }
    Ok(Outcome::Success)
}

/// `qlock status --chain`: each image's graph, node by node, with each holder's role.
pub(crate) fn status(args: &StatusArgs, out: &mut impl Write) -> Result<Outcome, Failure> {
    let mut failed = false;
    let mut images = Vec::new();
    for (n, name) in args.images.iter().enumerate() {
        let chain = match Chain::open(name, &LockOptions::default()) {
            Ok(chain) => chain,
            Err(e) => {
                failed = true;
                if args.json {
                    images.push(
                        json!({ "path": name.display().to_string(), "error": e.to_string(), "hint": e.hint() }),
                    );
                } else {
                    out.flush().map_err(Failure::Output)?;
                    say(&e.to_string());
                    crate::print_hint(e.hint());
                }
                continue;
            }
        };
        let paths: Vec<&Path> = chain.nodes().iter().map(Node::path).collect();
        let results = inspect(&paths);
        let mut nodes_json = Vec::new();
        if !args.json && n > 0 {
            writeln!(out).map_err(Failure::Output)?;
        }
        for (k, (node, r)) in chain.nodes().iter().zip(&results).enumerate() {
            let s = match r {
                Ok(s) => s,
                Err(e) => {
                    failed = true;
                    if !args.json {
                        out.flush().map_err(Failure::Output)?;
                        say(&message(e));
                        crate::print_hint(e.hint());
                    }
                    continue;
                }
            };
            let roles: Vec<(u32, String)> = s.holders.iter().map(|h| (h.pid, holder_role(h, node))).collect();
            if args.json {
                let mut v = status::to_json(s, node.path());
                let (role, depth) = role_name(node.role);
                v["role"] = json!(role);
                v["depth"] = json!(depth);
                v["format"] = json!(node.format.as_str());
                v["holder_roles"] = json!(
                    roles.iter().map(|(pid, text)| json!({"pid": pid, "role": text})).collect::<Vec<_>>()
                );
                nodes_json.push(v);
            } else {
                if k > 0 {
                    writeln!(out).map_err(Failure::Output)?;
                }
                print_node(out, s, node, &roles).map_err(Failure::Output)?;
            }
        }
        if args.json {
            let top = results.first().and_then(|r| r.as_ref().ok());
            let mut v = top
                .map_or_else(|| json!({ "path": name.display().to_string() }), |s| status::to_json(s, name));
            v["chain"] = Value::Array(nodes_json);
            images.push(v);
        }
    }
    if args.json {
        status::print_json(out, images)?;
    }
    Ok(if failed { Outcome::SomeFailed } else { Outcome::Success })
}

/// `top`, `backing` (with its depth), `data-file` (with the depth of its image).
fn role_name(role: Role) -> (&'static str, usize) {
    match role {
        Role::Top => ("top", 0),
        Role::Backing { depth } => ("backing", depth),
        Role::DataFile { depth, .. } => ("data-file", depth),
    }
}

fn describe(role: Role) -> String {
    match role {
        Role::Top => "top".into(),
        Role::Backing { depth } => format!("backing, depth {depth}"),
        Role::DataFile { depth: 0, .. } => "data-file".into(),
        Role::DataFile { depth, .. } => format!("data-file of the backing file at depth {depth}"),
    }
}

fn print_node(
    out: &mut impl Write,
    s: &ImageStatus,
    node: &Node,
    roles: &[(u32, String)],
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<14}{} ({}, {})",
        "node",
        node.path().display(),
        describe(node.role),
        node.format.as_str()
    )?;
    status::print_table(out, s, node.path())?;
    for (_, text) in roles {
        writeln!(out, "{:<14}{text}", "role")?;
    }
    Ok(())
}

/// What `node` is to the holder: the holder's other locked files (the same walk over
/// `/proc`) tell which image it opened; `node` is a backing or data file of the one whose
/// graph reaches it. "pid 4242 (qemu-io) holds base.qcow2 as a backing file of top.qcow2".
fn holder_role(h: &Holder, node: &Node) -> String {
    let who = format!("pid {} ({})", h.pid, h.command.as_deref().unwrap_or("?"));
    let here = node.path().display();
    let key = file_key(node.path());
    // The holder's files, each with the role `node` has in its graph; the top-most wins.
    let mut best: Option<(PathBuf, Role)> = None;
    for file in locked_files(h.pid) {
        if key.is_some() && file_key(&file) == key {
            continue;
        }
        let Ok(graph) = Chain::open(&file, &LockOptions::default().with_find_holders(false)) else {
            continue;
        };
        let Some(found) = graph.nodes().iter().find(|n| key.is_some() && file_key(n.path()) == key) else {
            continue;
        };
        let deeper = |r: Role| match r {
            Role::Top => 0,
            Role::Backing { depth } => depth,
            Role::DataFile { depth, .. } => depth + 1,
        };
        if best.as_ref().is_none_or(|(_, r)| deeper(found.role) > deeper(*r)) {
            best = Some((file, found.role));
        }
    }
    match best {
        None => format!("{who} holds {here} as its own image"),
        Some((top, role)) => {
            let top = shown(&top);
            match role {
                Role::Backing { depth: 1 } => format!("{who} holds {here} as a backing file of {top}"),
                Role::Backing { depth } => {
                    format!("{who} holds {here} as a backing file of {top} (depth {depth})")
                }
                Role::DataFile { depth: 0, .. } => format!("{who} holds {here} as the data file of {top}"),
                Role::DataFile { depth, .. } => {
                    format!("{who} holds {here} as the data file of a backing file of {top} (depth {depth})")
                }
                Role::Top => format!("{who} holds {here} as its own image"),
            }
        }
    }
}

/// A path as short as it can be said: relative to the working directory when below it.
fn shown(path: &Path) -> String {
    let cwd = std::env::current_dir().ok();
    cwd.and_then(|c| path.strip_prefix(c).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn file_key(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The regular files `pid` holds locks on (a `lock:` line in the descriptor's fdinfo).
fn locked_files(pid: u32) -> Vec<PathBuf> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return Vec::new() };
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in fds.flatten() {
        let Ok(info) = fs::read_to_string(entry.path()) else { continue };
        if !info.lines().any(|l| l.starts_with("lock:")) {
            continue;
        }
        let Ok(target) = fs::read_link(format!("/proc/{pid}/fd/{}", entry.file_name().to_string_lossy()))
        else {
            continue;
        };
        if target.is_absolute() && target.is_file() && !files.contains(&target) {
            files.push(target);
        }
    }
    files
}
