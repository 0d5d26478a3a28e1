//! Every process with an image open, locked or not, and what it is to a VM operator.
//!
//! The most common states of a VM image in use leave no lock bytes at all: QEMU with
//! `locking=off` (Proxmox's default), a QEMU waiting for an incoming migration, tools that ignore
//! locks. The `/proc` walk that names holders ([`crate::proc`]) also sees every descriptor on the
//! image; this module turns each into an [`Opener`]: its open mode, its locks (including
//! `flock(2)` ones, which QEMU never sees), the process's age, the systemd unit or cgroup it
//! runs in (libvirt's `machine-qemu\x2dN\x2dNAME.scope` names the VM), QEMU's `-name guest=`,
//! and a [`Label`] saying what all that means.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::perm::Perm;
use crate::proc::{self, Found, HeldRange, Holder, OpenFd};
use crate::protocol::LockSet;
use crate::sys::LockKind;

/// How a descriptor was opened: the access mode of its `open(2)` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenMode {
    /// `O_RDONLY`.
    ReadOnly,
    /// `O_RDWR`.
    ReadWrite,
    /// `O_WRONLY` (rare for an image).
    WriteOnly,
}

impl OpenMode {
    /// From the `flags:` line of fdinfo.
    fn from_flags(flags: u32) -> OpenMode {
        match flags & nix::libc::O_ACCMODE as u32 {
            0 => OpenMode::ReadOnly,
            1 => OpenMode::WriteOnly,
            _ => OpenMode::ReadWrite,
        }
    }

    /// Whether the descriptor can write the image.
    pub fn writes(self) -> bool {
        self != OpenMode::ReadOnly
    }

    /// `ro`, `rw` or `wo`.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenMode::ReadOnly => "ro",
            OpenMode::ReadWrite => "rw",
            OpenMode::WriteOnly => "wo",
        }
    }
}

/// What an opener is, from its locks and open mode, in words a VM operator reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Label {
    /// Holds QEMU's protocol bytes: a QEMU, or a tool taking part in its protocol (qlock).
    Qemu {
        /// The permissions it uses (bytes 100+i).
        uses: Perm,
        /// The permissions it refuses to others (bytes 200+i).
        refuses: Perm,
    },
    /// Holds byte 100 alone: a force-share (`-U`) reader, which refuses nothing.
    ForceShare,
    /// A `flock(2)` lock on the whole file: other VMMs and tools use it; QEMU never sees it.
    Flock {
        /// `LOCK_EX` rather than `LOCK_SH`.
        exclusive: bool,
    },
    /// A lock on byte 0 (not the whole file): libvirt's virtlockd-style lease.
    Lease {
        /// A write lock.
        write: bool,
    },
    /// An OFD or POSIX lock on the whole file: another VMM or tool. QEMU sees every byte held.
    WholeFile {
        /// A write lock.
        write: bool,
        /// OFD or POSIX.
        kind: LockKind,
    },
    /// Byte-range locks that fit none of the above.
    OtherLocks,
    /// Open read-write (or write-only) with no lock at all: QEMU with `locking=off`, a tool
    /// that ignores locks, or an inactive (incoming-migration) QEMU.
    UnlockedWriter,
    /// Open read-only with no lock at all.
    UnlockedReader,
}

impl Label {
    /// A stable token for scripts: `qemu`, `force-share`, `flock`, `lease`, `whole-file`,
    /// `other-locks`, `unlocked-rw`, `unlocked-ro`.
    pub fn class(&self) -> &'static str {
        match self {
            Label::Qemu { .. } => "qemu",
            Label::ForceShare => "force-share",
            Label::Flock { .. } => "flock",
            Label::Lease { .. } => "lease",
            Label::WholeFile { .. } => "whole-file",
            Label::OtherLocks => "other-locks",
            Label::UnlockedWriter => "unlocked-rw",
            Label::UnlockedReader => "unlocked-ro",
        }
    }

    /// The label of a descriptor with these locks, opened so.
    fn of(ranges: &[HeldRange], flock: Option<bool>, mode: OpenMode) -> Label {
        let held = ranges.iter().fold(LockSet::EMPTY, |mut set, r| {
            for b in crate::perm::PROTOCOL_BYTES {
                if r.covers(b) {
                    set.add_byte(b);
                }
            }
            set
        });
        let foreign = ranges.iter().filter(|r| r.foreign_reason().is_some());
        if let Some(r) = ranges.iter().find(|r| r.start == 0 && r.end.is_none()) {
            // The kind is filled in by the caller, which knows it.
            return Label::WholeFile { write: r.write, kind: LockKind::Ofd };
        }
        if let Some(r) = ranges.iter().find(|r| r.covers(0)) {
            return Label::Lease { write: r.write };
        }
        if !held.is_empty() && foreign.clone().all(|r| !r.write) {
            if held == LockSet::new(Perm::CONSISTENT_READ, Perm::empty()) {
                return Label::ForceShare;
            }
            return Label::Qemu { uses: held.perm, refuses: held.unshared };
        }
        if let Some(exclusive) = flock {
            return Label::Flock { exclusive };
        }
        match (ranges.is_empty(), mode.writes()) {
            (false, _) => Label::OtherLocks,
            (true, true) => Label::UnlockedWriter,
            (true, false) => Label::UnlockedReader,
        }
    }
}

impl fmt::Display for Label {
    /// `QEMU-protocol holder: uses consistent-read,write,resize; refuses write,resize`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rw = |write: bool| if write { "write" } else { "read" };
        match self {
            Label::Qemu { uses, refuses } => {
                write!(f, "QEMU-protocol holder: uses {uses}; refuses {refuses}")
            }
            Label::ForceShare => f.write_str("force-share reader (-U): byte 100 only, refuses nothing"),
            Label::Flock { exclusive } => write!(
                f,
                "flock(2) {} whole-file lock (other VMMs use it; QEMU never sees it)",
                if *exclusive { "exclusive" } else { "shared" }
            ),
            Label::Lease { write } => write!(f, "byte-0 {} lease (libvirt virtlockd style)", rw(*write)),
            Label::WholeFile { write, kind } => {
                let kind = match kind {
                    LockKind::Ofd => "OFD",
                    LockKind::Posix => "POSIX",
                };
                write!(
                    f,
                    "whole-file {kind} {} lock (another VMM or tool; QEMU sees every byte held)",
                    rw(*write)
                )
            }
            Label::OtherLocks => f.write_str("byte-range locks outside QEMU's protocol"),
            Label::UnlockedWriter => f.write_str(
                "open for writing with no lock: QEMU with locking=off, a tool that ignores locks, or an \
                 inactive migration target",
            ),
            Label::UnlockedReader => f.write_str("open read-only with no lock"),
        }
    }
}

/// One descriptor of one process open on an image, locked or not.
///
/// ```
/// use qlock_core::{Access, ImageLock, Label, OpenMode, inspect};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("disk.img");
/// # std::fs::write(&path, b"").unwrap();
///
/// let _backup = ImageLock::acquire(&path, Access::FORCE_SHARE)?;
/// let status = inspect(&[&path]).remove(0)?;
/// let me = status.openers.iter().find(|o| o.pid == std::process::id()).unwrap();
/// assert_eq!((me.mode, me.label), (OpenMode::ReadOnly, Label::ForceShare));
/// # Ok::<(), qlock_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Opener {
    /// The process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), if readable.
    pub command: Option<String>,
    /// The descriptor.
    pub fd: u32,
    /// How it was opened.
    pub mode: OpenMode,
    /// OFD or POSIX, when it holds byte-range locks.
    pub lock_kind: Option<LockKind>,
    /// Its byte-range locks on the image (for POSIX locks, those of its process).
    pub ranges: Vec<HeldRange>,
    /// A `flock(2)` lock through it: `Some(true)` exclusive, `Some(false)` shared.
    pub flock: Option<bool>,
    /// What it is.
    pub label: Label,
    /// How long the process has run.
    pub age: Option<Duration>,
    /// The process's owner.
    pub uid: Option<u32>,
    /// Its cgroup (the unified hierarchy's, else systemd's), e.g.
    /// `/machine.slice/machine-qemu\x2d1\x2dvm1.scope/libvirt/emulator`.
    pub cgroup: Option<String>,
    /// The systemd unit it runs in (the innermost `.service` or `.scope` of its cgroup).
    pub unit: Option<String>,
    /// The VM name libvirt gave its scope (`machine-qemu\x2d1\x2dvm1.scope`: `vm1`).
    pub machine: Option<String>,
    /// QEMU's `-name guest=NAME` (or `-name NAME`), when the process is a QEMU.
    pub qemu_name: Option<String>,
}

impl Opener {
    /// Whether it holds any lock on the image (byte-range or `flock(2)`).
    pub fn locks(&self) -> bool {
        !self.ranges.is_empty() || self.flock.is_some()
    }

    /// Whether it can write the image and holds no lock at all: what `check --strict` refuses.
    pub fn is_unlocked_writer(&self) -> bool {
        self.mode.writes() && !self.locks()
    }

    /// The VM it belongs to: libvirt's scope name, else QEMU's `-name`.
    pub fn vm(&self) -> Option<&str> {
        self.machine.as_deref().or(self.qemu_name.as_deref())
    }
}

impl fmt::Display for Opener {
    /// `pid 4242 (qemu-system-x86) fd 12 rw, up 3h 2m, vm vm1, unit machine-qemu\x2d1\x2dvm1.scope:
    /// open for writing with no lock: ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} ({}) fd {} {}",
            self.pid,
            self.command.as_deref().unwrap_or("?"),
            self.fd,
            self.mode.as_str()
        )?;
        if let Some(age) = self.age {
            write!(f, ", up {}", Age(age))?;
        }
        if let Some(vm) = self.vm() {
            write!(f, ", vm {vm}")?;
        }
        if let Some(unit) = &self.unit {
            write!(f, ", unit {unit}")?;
        }
        write!(f, ": {}", self.label)
    }
}

/// A duration as people read an uptime: `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
struct Age(Duration);

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
        match (d, h, m) {
            (0, 0, 0) => write!(f, "{s}s"),
            (0, 0, _) => write!(f, "{m}m {s}s"),
            (0, _, _) => write!(f, "{h}h {m}m"),
            _ => write!(f, "{d}d {h}h"),
        }
    }
}

/// What `/proc/PID` says of every process that has one of the walk's images open, each read
/// once however many images it has open. Reading them is most of an inspection's cost after the
/// walk itself (five small files a process, ~20 us each on the project's VM), so many are read
/// on two threads, as the walk's are ([`proc::in_halves`]).
pub(crate) struct Facts(HashMap<u32, Process>);

impl Facts {
    pub(crate) fn read<'a>(found: impl Iterator<Item = &'a Found>) -> Facts {
        let clock = Clock::now();
        let mut pids: Vec<u32> = found.flat_map(|f| f.open.iter().map(|d| d.pid)).collect();
        pids.sort_unstable();
        pids.dedup();
        let read =
            |pids: &[u32]| pids.iter().map(|&pid| (pid, Process::read(pid, &clock))).collect::<Vec<_>>();
        Facts(proc::in_halves(&pids, read).into_iter().flatten().collect())
    }
}

/// The openers among the descriptors one walk found on one image, by pid and descriptor.
pub(crate) fn openers(found: &Found, facts: &Facts) -> Vec<Opener> {
    let unknown = Process::default();
    let mut out: Vec<Opener> = found
        .open
        .iter()
        .map(|d| opener(d, &found.holders, facts.0.get(&d.pid).unwrap_or(&unknown)))
        .collect();
    out.sort_by_key(|o| (o.pid, o.fd));
    out
}

fn opener(d: &OpenFd, holders: &[Holder], p: &Process) -> Opener {
    let own = holders.iter().find(|h| h.pid == d.pid && h.fd == Some(d.fd));
    // POSIX locks belong to the process: another descriptor of it on the image is covered too.
    let posix = || holders.iter().find(|h| h.pid == d.pid && h.kind == LockKind::Posix);
    let (lock_kind, ranges) = match own.or_else(posix) {
        Some(h) => (Some(h.kind), h.ranges.clone()),
        None => (None, Vec::new()),
    };
    let mode = OpenMode::from_flags(d.flags);
    let mut label = Label::of(&ranges, d.flock, mode);
    if let (Label::WholeFile { write, .. }, Some(kind)) = (label, lock_kind) {
        label = Label::WholeFile { write, kind };
    }
    Opener {
        pid: d.pid,
        command: p.command.clone(),
        fd: d.fd,
        mode,
        lock_kind,
        ranges,
        flock: d.flock,
        label,
        age: p.age,
        uid: p.uid,
        cgroup: p.cgroup.clone(),
        unit: p.cgroup.as_deref().and_then(unit),
        machine: p.cgroup.as_deref().and_then(machine),
        qemu_name: p.qemu_name.clone(),
    }
}

/// The clock a process's age is read against: uptime and clock ticks, read once per walk.
struct Clock {
    uptime: Option<f64>,
    ticks: Option<u64>,
}

impl Clock {
    fn now() -> Clock {
        let uptime = fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|u| u.parse().ok()));
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|&t| t > 0);
        Clock { uptime, ticks }
    }

    /// How long a process started `start` clock ticks after boot has run.
    fn age(&self, start: u64) -> Option<Duration> {
        let started = start as f64 / self.ticks? as f64;
        Duration::try_from_secs_f64((self.uptime? - started).max(0.0)).ok()
    }
}

/// What `/proc/PID` says about one opener's process; anything unreadable is `None`.
#[derive(Default)]
struct Process {
    command: Option<String>,
    age: Option<Duration>,
    uid: Option<u32>,
    cgroup: Option<String>,
    qemu_name: Option<String>,
}

impl Process {
    fn read(pid: u32, clock: &Clock) -> Process {
        let file = |name: &str| fs::read(format!("/proc/{pid}/{name}")).ok();
        let command = proc::comm(pid);
        let age =
            file("stat").and_then(|s| start_time(&String::from_utf8_lossy(&s))).and_then(|t| clock.age(t));
        let uid = fs::metadata(format!("/proc/{pid}")).ok().map(|m| m.uid());
        let cgroup = file("cgroup").and_then(|c| cgroup(&String::from_utf8_lossy(&c)));
        let args: Vec<String> = file("cmdline")
            .map(|c| c.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
            .unwrap_or_default();
        let is_qemu = command.as_deref().is_some_and(|c| c.starts_with("qemu"))
            || args.first().is_some_and(|a| a.rsplit('/').next().is_some_and(|b| b.starts_with("qemu")));
        let qemu_name = if is_qemu { qemu_name(&args) } else { None };
        Process { command, age, uid, cgroup, qemu_name }
    }
}

/// Field 22 of `/proc/PID/stat`, the start time in clock ticks after boot. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn start_time(stat: &str) -> Option<u64> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// The process's cgroup path: the unified hierarchy's (`0::`), else systemd's.
fn cgroup(text: &str) -> Option<String> {
    let path = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).map(str::to_string);
    let v1 = || text.lines().find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p.to_string()));
    path("0::").filter(|p| p != "/").or_else(v1).or_else(|| path("0::"))
}

/// The innermost systemd `.service` or `.scope` of a cgroup path.
fn unit(cgroup: &str) -> Option<String> {
    cgroup.rsplit('/').find(|c| c.ends_with(".service") || c.ends_with(".scope")).map(str::to_string)
}

/// The VM name in libvirt's scope: `machine-qemu\x2d1\x2dvm1.scope` is VM `vm1` (id 1).
fn machine(cgroup: &str) -> Option<String> {
    cgroup.split('/').find_map(|c| {
        let c = unescape(c);
        let rest = c.strip_prefix("machine-qemu-")?.strip_suffix(".scope")?;
        let (id, name) = rest.split_once('-')?;
        (id.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty()).then(|| name.to_string())
    })
}

/// systemd's unit-name escaping undone: `\x2d` is `-`.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 2..i + 4).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], b.get(i + 1), hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'\\', Some(b'x'), Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// QEMU's `-name guest=NAME,...` or `-name NAME,...` (commas doubled inside a value).
fn qemu_name(args: &[String]) -> Option<String> {
    let i = args.iter().position(|a| a == "-name" || a == "--name")?;
    let value = args.get(i + 1)?;
    // QEMU's option syntax: `,,` is a comma inside a value.
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    let guest = parts.iter().find_map(|p| p.strip_prefix("guest="));
    let implied = parts.first().filter(|p| !p.contains('=')).map(String::as_str);
    guest.or(implied).filter(|n| !n.is_empty()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn reads_qemus_name_option() {
        assert_eq!(
            qemu_name(&strs(&["qemu", "-name", "guest=vm1,debug-threads=on"])).as_deref(),
            Some("vm1")
        );
        assert_eq!(qemu_name(&strs(&["qemu", "-name", "vm2"])).as_deref(), Some("vm2"));
        assert_eq!(qemu_name(&strs(&["qemu", "--name", "a,,b,process=x"])).as_deref(), Some("a,b"));
        assert_eq!(qemu_name(&strs(&["qemu", "-name", "process=x,guest=g"])).as_deref(), Some("g"));
        assert_eq!(qemu_name(&strs(&["qemu", "-name"])), None);
        assert_eq!(qemu_name(&strs(&["qemu", "-m", "1G"])), None);
    }

    #[test]
    fn reads_cgroups_units_and_libvirt_machines() {
        let v2 = "0::/machine.slice/machine-qemu\\x2d3\\x2dweb\\x2d01.scope/libvirt/emulator\n";
        let path = cgroup(v2).unwrap();
        assert_eq!(unit(&path).as_deref(), Some("machine-qemu\\x2d3\\x2dweb\\x2d01.scope"));
        assert_eq!(machine(&path).as_deref(), Some("web-01"));
        let hybrid = "1:name=systemd:/system.slice/backup.service\n0::/\n";
        assert_eq!(cgroup(hybrid).as_deref(), Some("/system.slice/backup.service"));
        assert_eq!(unit("/system.slice/backup.service").as_deref(), Some("backup.service"));
        assert_eq!(machine("/system.slice/backup.service"), None);
        assert_eq!(cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(unescape("a\\x2db\\x2"), "a-b\\x2");
    }

    #[test]
    fn reads_the_start_time_past_odd_command_names() {
        let stat = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("garbage"), None);
    }

    #[test]
    fn labels_say_what_the_locks_mean() {
        let r = |start, end, write| HeldRange { start, end, write };
        let ro = OpenMode::ReadOnly;
        assert_eq!(Label::of(&[], None, OpenMode::ReadWrite), Label::UnlockedWriter);
        assert_eq!(Label::of(&[], None, OpenMode::WriteOnly), Label::UnlockedWriter);
        assert_eq!(Label::of(&[], None, ro), Label::UnlockedReader);
        assert_eq!(Label::of(&[], Some(true), ro), Label::Flock { exclusive: true });
        assert_eq!(Label::of(&[r(100, Some(100), false)], None, ro), Label::ForceShare);
        let qemu = [r(100, Some(101), false), r(103, Some(103), false), r(201, Some(201), false)];
        let label = Label::of(&qemu, None, ro);
        assert_eq!(
            label,
            Label::Qemu { uses: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE, refuses: Perm::WRITE }
        );
        assert_eq!(
            label.to_string(),
            "QEMU-protocol holder: uses consistent-read,write,resize; refuses write"
        );
        assert_eq!(Label::of(&[r(0, Some(0), true)], None, ro), Label::Lease { write: true });
        assert!(matches!(Label::of(&[r(0, None, false)], None, ro), Label::WholeFile { write: false, .. }));
        assert_eq!(Label::of(&[r(500, Some(510), false)], None, ro), Label::OtherLocks);
        assert_eq!(Label::of(&[r(101, Some(101), true)], None, ro), Label::OtherLocks);
    }

    #[test]
    fn ages_read_like_uptimes() {
        let s = |n| Age(Duration::from_secs(n)).to_string();
        assert_eq!(
            (s(12), s(250), s(7500), s(3 * 86400 + 7200)),
            ("12s".into(), "4m 10s".into(), "2h 5m".into(), "3d 2h".into())
        );
    }
}
