//! A real two-host GlusterFS test bed on one machine, for testing locks on shared storage
//! (feature `gluster`).
//!
//! On shared storage the kernel forwards QEMU's OFD locks to the filesystem's lock manager, and
//! another host sees them. [`GlusterBed::start`] builds that with real GlusterFS: `glusterd` and
//! one brick in a network namespace `…-storage`, and two FUSE clients of the same volume whose
//! daemons run in namespaces `…-hostA` and `…-hostB`, each reaching the storage namespace
//! through its own veth pair, so each can be cut off alone ([`Host::partition`]).
//!
//! ```text
//!  hostA: glusterfs client ──veth── storage: glusterd + brick ──veth── hostB: glusterfs client
//!         mounted on <dir>/mnt-a          198.18.0.1 on lo                mounted on <dir>/mnt-b
//! ```
//!
//! Both mounts are in this process's mount namespace; a "host" is the client daemon behind a
//! mount, not the network namespace of the process using it: a lock taken through
//! [`Host::path`] of host A is host A's lock wherever the locking process runs.
//!
//! Everything the bed creates carries its id (`<pid>-<n>`): the state directory
//! `$TMPDIR/qlock-gluster-<id>` (glusterd's private working, run and log directories, the brick,
//! the mount points), the namespaces `qlock-<id>-storage|hostA|hostB`, and the volume
//! `qlock-<id>`, so two beds never meet. Dropping the bed undoes all of it: both mounts, the
//! volume, every process whose command line names the state directory (glusterd, the brick,
//! the clients: only this bed's), the namespaces with their veths, and the directory. Where
//! glusterd needs root: it needs root, `/dev/fuse`, network namespaces, and the Debian
//! packages `glusterfs-server glusterfs-client`; [`GlusterBed::start_or_skip`] skips without
//! them (and fails under `CI=true`).
//!
//! One thing outside the state directory: each brick listens on a unix socket that glusterd
//! always puts in `/var/run/gluster/` (the brick's `-S` option); the bed records it and
//! removes it on teardown. glusterd also creates the empty directory `/var/run/gluster/snaps`
//! once, which is left (other beds may be using it).
//!
//! ```no_run
//! use qlock_testkit::gluster::GlusterBed;
//!
//! let Some(bed) = GlusterBed::start_or_skip() else { return Ok(()) };
//! std::fs::write(bed.host_a().path("disk.img"), vec![0; 1 << 20])?;
//! let held_on_a = qlock_core::ImageLock::acquire(bed.host_a().path("disk.img"), qlock_core::Access::WRITE)?;
//! // Host B sees host A's locks through the brick.
//! assert!(qlock_core::ImageLock::acquire(bed.host_b().path("disk.img"), qlock_core::Access::WRITE).is_err());
//! # drop(held_on_a);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// The brick's address, on the storage namespace's loopback (the `dummy` link type is missing
/// on some kernels); RFC 2544's benchmarking range, inside namespaces the bed owns.
pub const BRICK_ADDR: &str = "198.18.0.1";

/// How long glusterd may take to answer its CLI (observed: about 2.5 s after start).
const GLUSTERD_READY: Duration = Duration::from_secs(30);
/// How long a client may take to mount and answer.
const MOUNT_READY: Duration = Duration::from_secs(20);
/// How long one `gluster` CLI call or one teardown step may take.
const STEP: Duration = Duration::from_secs(30);

/// Prefix of every bed's state directory (in `std::env::temp_dir()`).
pub const DIR_PREFIX: &str = "qlock-gluster-";

/// Beds started by this process so far, for unique ids.
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// One client "host": a glusterfs FUSE client daemon in its own network namespace.
#[derive(Debug)]
pub struct Host {
    name: &'static str,
    netns: String,
    mount: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
    /// Its veth end, inside its namespace.
    link: &'static str,
    /// Its address, and the storage namespace's end of its veth pair.
    addr: &'static str,
    gateway: &'static str,
    /// The storage namespace's end of the veth pair.
    storage_link: &'static str,
}

impl Host {
    /// `A` or `B`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The network namespace its client daemon runs in (`/run/netns/<name>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Where this host's client mounts the volume.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// `name` on the volume, as this host sees it.
    pub fn path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.mount.join(name)
    }

    /// The pid of this host's glusterfs client daemon, while it runs.
    pub fn client_pid(&self) -> Option<u32> {
        read_pid(&self.pid_file).filter(|&p| is_alive(p))
    }

    /// The client daemon's log file.
    pub fn client_log(&self) -> &Path {
        &self.log
    }

    /// `program` run inside this host's network namespace (`nsenter --net`, which keeps the
    /// mount namespace, unlike `ip netns exec`): for tools that talk to the network. A
    /// process's lock goes through whichever mount its path names, whatever its namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns)).arg("--").arg(program);
        cmd
    }

    /// "Crashes" the host: SIGKILLs its client daemon. The mount stays, dead (`ENOTCONN`),
    /// until teardown; the brick sees the connection close at once.
    ///
    /// # Errors
    /// The daemon is not running.
    pub fn kill_client(&self) -> Result<()> {
        let pid = self.client_pid().ok_or(Error::Gone { pid: 0, status: None })?;
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
            .map_err(|e| Error::Io { what: "killing the glusterfs client", source: e.into() })?;
        wait_gone(&[pid], STEP);
        Ok(())
    }

    /// Cuts this host off the network: its veth end goes down (packets are dropped, no
    /// connection is closed), as in a network partition.
    ///
    /// # Errors
    /// `ip` failed.
    pub fn partition(&self) -> Result<()> {
        ip(&["-n", &self.netns, "link", "set", self.link, "down"])
    }

    /// Undoes [`Host::partition`]: the link comes back, with its address and route.
    ///
    /// # Errors
    /// `ip` failed.
    pub fn heal(&self) -> Result<()> {
        ip(&["-n", &self.netns, "link", "set", self.link, "up"])?;
        // Taking a link down removes its routes; the connected one comes back, the host route
        // to the brick does not.
        let _ = run(Command::new("ip").args([
            "-n",
            &self.netns,
            "route",
            "replace",
            BRICK_ADDR,
            "via",
            self.gateway,
        ]));
        Ok(())
    }
}

/// A running two-host GlusterFS bed; dropping it tears everything down.
#[derive(Debug)]
pub struct GlusterBed {
    id: String,
    dir: PathBuf,
    volume: String,
    storage_netns: String,
    hosts: [Host; 2],
    keep: bool,
}

impl GlusterBed {
    /// Builds the bed and returns once both clients have the volume mounted and answer
    /// (about 3 s, most of it glusterd starting).
    ///
    /// # Errors
    /// [`Error::NoTestBed`] (a skip, see [`Error::is_skip`]) when this machine cannot have it:
    /// not root, no `/dev/fuse`, no network namespaces, GlusterFS not installed. Otherwise the
    /// step that failed; whatever was built is torn down before returning.
    pub fn start() -> Result<GlusterBed> {
        GlusterBed::start_with(&[])
    }

    /// As [`GlusterBed::start`], with `gluster volume set VOLUME KEY VALUE` for each option
    /// before the volume starts, so the clients mount with them (e.g. `client.strict-locks on`,
    /// `server.keepalive-time 2`).
    ///
    /// # Errors
    /// As [`GlusterBed::start`]; an unknown option or value fails the start.
    pub fn start_with(options: &[(&str, &str)]) -> Result<GlusterBed> {
        preflight()?;
        let (id, dir) = fresh_dir()?;
        let mut bed = GlusterBed::for_id(&id, dir);
        // From here on a failure drops `bed`, which tears down what exists.
        bed.build(options)?;
        Ok(bed)
    }

    /// As [`GlusterBed::start`], but `None` (after printing why) when this machine cannot have
    /// the bed, so the test can return. Under `CI=true` that fails the test instead.
    ///
    /// # Panics
    /// When the bed cannot be built for another reason, or cannot be had under `CI=true`.
    pub fn start_or_skip() -> Option<GlusterBed> {
        GlusterBed::start_or_skip_with(&[])
    }

    /// As [`GlusterBed::start_with`], skipping as [`GlusterBed::start_or_skip`] does.
    ///
    /// # Panics
    /// As [`GlusterBed::start_or_skip`].
    pub fn start_or_skip_with(options: &[(&str, &str)]) -> Option<GlusterBed> {
        match GlusterBed::start_with(options) {
            Ok(bed) => Some(bed),
            Err(e) if e.is_skip() && std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipped: {e}");
                None
            }
            Err(e) => panic!("GlusterFS test bed: {e}"),
        }
    }

    /// The names of bed `id`, built or not (for teardown of a bed this process did not start).
    fn for_id(id: &str, dir: PathBuf) -> GlusterBed {
        let host = |name, link, addr, gateway, storage_link| Host {
            name,
            netns: format!("qlock-{id}-host{name}"),
            mount: dir.join(format!("mnt-{}", name.to_ascii_lowercase())),
            pid_file: dir.join(format!("run/client-{}.pid", name.to_ascii_lowercase())),
            log: dir.join(format!("log/client-{}.log", name.to_ascii_lowercase())),
            link,
            addr,
            gateway,
            storage_link,
        };
        GlusterBed {
            id: id.to_string(),
            volume: format!("qlock-{id}"),
            storage_netns: format!("qlock-{id}-storage"),
            hosts: [
                host("A", "gl0", "198.18.1.2/30", "198.18.1.1", "to-a"),
                host("B", "gl0", "198.18.2.2/30", "198.18.2.1", "to-b"),
            ],
            dir,
            keep: false,
        }
    }

    fn build(&mut self, options: &[(&str, &str)]) -> Result<()> {
        for sub in ["wd", "run", "log", "brick", "mnt-a", "mnt-b"] {
            fs::create_dir_all(self.dir.join(sub)).map_err(Error::io("creating the bed's directories"))?;
        }
        self.network()?;
        self.glusterd()?;
        let brick = format!("{BRICK_ADDR}:{}", self.dir.join("brick/b").display());
        self.gluster(&["volume", "create", &self.volume, &brick, "force"])?;
        for (key, value) in options {
            self.gluster(&["volume", "set", &self.volume, key, value])?;
        }
        self.gluster(&["volume", "start", &self.volume])?;
        self.record_brick_socket();
        for host in &self.hosts {
            self.mount_client(host)?;
        }
        Ok(())
    }

    /// The three namespaces, the brick's address on storage's loopback, two veth pairs.
    fn network(&self) -> Result<()> {
        let s = self.storage_netns.as_str();
        ip(&["netns", "add", s]).map_err(skip_if_no_netns)?;
        ip(&["-n", s, "link", "set", "lo", "up"])?;
        ip(&["-n", s, "addr", "add", &format!("{BRICK_ADDR}/32"), "dev", "lo"])?;
        for h in &self.hosts {
            let n = h.netns.as_str();
            ip(&["netns", "add", n])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            // Created straight inside the namespaces: the names never exist in the root one.
            ip(&[
                "link",
                "add",
                "name",
                h.storage_link,
                "netns",
                s,
                "type",
                "veth",
                "peer",
                "name",
                h.link,
                "netns",
                n,
            ])?;
            let peer = format!("{}/30", h.gateway);
            ip(&["-n", s, "addr", "add", &peer, "dev", h.storage_link])?;
            ip(&["-n", n, "addr", "add", h.addr, "dev", h.link])?;
            ip(&["-n", s, "link", "set", h.storage_link, "up"])?;
            ip(&["-n", n, "link", "set", h.link, "up"])?;
            ip(&["-n", n, "route", "add", BRICK_ADDR, "via", h.gateway])?;
        }
        Ok(())
    }

    /// glusterd in the storage namespace with private working, run and log directories and
    /// CLI socket; returns once it answers `gluster pool list`.
    fn glusterd(&self) -> Result<()> {
        let vol = self.dir.join("glusterd.vol");
        let d = |s: &str| self.dir.join(s).display().to_string();
        let config = format!(
            "volume management\n    type mgmt/glusterd\n    option working-directory {}\n    \
             option run-directory {}\n    option logging-directory {}\n    option glusterd-sockfile {}\n    \
             option transport-type socket\n    option transport.socket.listen-port 24007\n    \
             option transport.socket.bind-address {BRICK_ADDR}\n    option ping-timeout 0\n    \
             option event-threads 1\nend-volume\n",
            d("wd"),
            d("run"),
            d("log"),
            d("run/glusterd.socket"),
        );
        fs::write(&vol, config).map_err(Error::io("writing glusterd.vol"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.storage_netns))
            .arg("--")
            .arg("glusterd")
            .arg("-f")
            .arg(&vol)
            .arg("-p")
            .arg(self.dir.join("run/glusterd.pid"))
            .arg("-l")
            .arg(self.dir.join("log/glusterd.log"));
        run(&mut cmd)?;
        let answered =
            poll_until(GLUSTERD_READY, Duration::from_millis(50), || self.gluster(&["pool", "list"]).ok());
        answered
            .map(|_| ())
            .ok_or_else(|| step_error("glusterd did not answer `gluster pool list`", &self.dir))
    }

    /// Notes the brick's unix socket (always in /var/run/gluster) for teardown.
    fn record_brick_socket(&self) {
        for pid in self.processes() {
            let args = cmdline(pid);
            if let Some(i) = args.iter().position(|a| a == "-S")
                && let Some(sock) = args.get(i + 1)
            {
                let _ = fs::write(self.dir.join("run/brick-socket"), sock);
            }
        }
    }

    /// Starts `host`'s client and returns once the mount answers.
    fn mount_client(&self, host: &Host) -> Result<()> {
        let mut cmd = host.command("glusterfs");
        cmd.arg(format!("--volfile-server={BRICK_ADDR}"))
            .arg(format!("--volfile-id={}", self.volume))
            .arg("-p")
            .arg(&host.pid_file)
            .arg("-l")
            .arg(&host.log)
            .arg(&host.mount);
        run(&mut cmd)?;
        let ready = poll_until(MOUNT_READY, Duration::from_millis(20), || {
            (is_mounted(&host.mount) && fs::read_dir(&host.mount).is_ok()).then_some(())
        });
        ready
            .map(|_| ())
            .ok_or_else(|| step_error(&format!("host {}'s client did not mount", host.name), &self.dir))
    }

    /// The bed's id (`<pid>-<n>`), for `cargo xtask gluster down ID`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The volume's name.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Host A.
    pub fn host_a(&self) -> &Host {
        &self.hosts[0]
    }

    /// Host B.
    pub fn host_b(&self) -> &Host {
        &self.hosts[1]
    }

    /// Runs the `gluster` CLI against this bed's glusterd (`--mode=script`), returning stdout.
    ///
    /// # Errors
    /// The CLI failed: its output.
    pub fn gluster(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("gluster");
        cmd.arg(format!("--glusterd-sock={}", self.dir.join("run/glusterd.socket").display()))
            .arg(format!("--log-file={}", self.dir.join("log/cli.log").display()))
            .arg("--mode=script")
            .args(args);
        let out = run(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pids of this bed's processes: every process whose command line names the state
    /// directory (glusterd, the brick, the clients), zombies excluded.
    pub fn processes(&self) -> Vec<u32> {
        processes_naming(&self.dir)
    }

    /// Leaves the bed running when dropped (for `cargo xtask gluster up`); [`GlusterBed::down`]
    /// tears it down later.
    pub fn keep(mut self) -> String {
        self.keep = true;
        self.id.clone()
    }

    /// Tears down bed `id` (started by any process): returns what could not be undone.
    pub fn down(id: &str) -> Vec<String> {
        let mut bed = GlusterBed::for_id(id, std::env::temp_dir().join(format!("{DIR_PREFIX}{id}")));
        bed.keep = true;
        bed.teardown()
    }

    /// The ids of the beds whose state directory exists.
    pub fn list() -> Vec<String> {
        let Ok(dir) = fs::read_dir(std::env::temp_dir()) else { return Vec::new() };
        let mut ids: Vec<String> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix(DIR_PREFIX).map(str::to_string))
            .collect();
        ids.sort();
        ids
    }

    /// What bed `id` left behind, if anything: mounts, processes, namespaces, the state
    /// directory, the brick socket. Empty after a clean teardown.
    pub fn leftovers(id: &str) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{id}"));
        let mut left = Vec::new();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let needle = dir.display().to_string();
        left.extend(info.lines().filter(|l| l.contains(&needle)).map(|l| format!("mount: {l}")));
        left.extend(
            processes_naming(&dir).into_iter().map(|p| format!("process {p}: {}", cmdline(p).join(" "))),
        );
        let prefix = format!("qlock-{id}-");
        if let Ok(names) = fs::read_dir("/run/netns") {
            left.extend(
                names
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .map(|n| format!("network namespace {n}")),
            );
        }
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        left
    }

    /// Undoes everything, in order, carrying on past failures; returns them.
    fn teardown(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        let brick_socket = fs::read_to_string(self.dir.join("run/brick-socket")).ok();
        for host in &self.hosts {
            if is_mounted(&host.mount) && run(Command::new("umount").arg(&host.mount)).is_err() {
                // A dead client (ENOTCONN) or a file still open: detach it anyway.
                if let Err(e) = run(Command::new("umount").arg("-l").arg(&host.mount)) {
                    failed.push(format!("unmounting {}: {e}", host.mount.display()));
                }
            }
        }
        if self.dir.join("run/glusterd.socket").exists() && !self.processes().is_empty() {
            // Stops the brick the way glusterd does; failures are covered by the kills below.
            let _ = self.gluster(&["volume", "stop", &self.volume, "force"]);
        }
        let pids = self.processes();
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if !wait_gone(&pids, Duration::from_secs(5)) {
            for pid in self.processes() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            if !wait_gone(&self.processes(), STEP) {
                failed.push(format!("processes still running: {:?}", self.processes()));
            }
        }
        if let Some(sock) =
            brick_socket.filter(|s| s.starts_with("/var/run/gluster/") || s.starts_with("/run/gluster/"))
        {
            let _ = fs::remove_file(sock.trim());
        }
        for ns in std::iter::once(&self.storage_netns).chain(self.hosts.iter().map(|h| &h.netns)) {
            if Path::new("/run/netns").join(ns).exists()
                && let Err(e) = ip(&["netns", "del", ns])
            {
                failed.push(format!("deleting namespace {ns}: {e}"));
            }
        }
        if self.dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.dir)
        {
            failed.push(format!("removing {}: {e}", self.dir.display()));
        }
        failed
    }
}

impl Drop for GlusterBed {
    /// Tears the bed down (unless [`GlusterBed::keep`] was called), printing what failed.
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for failure in self.teardown() {
            eprintln!("gluster bed {}: teardown: {failure}", self.id);
        }
    }
}

/// Calls `f` every `interval` until it returns `Some`, for at most `deadline`: the value and
/// when it came. For effects only polling can observe (a mount answering, a lock vanishing on
/// another host); never a sleep standing in for a handshake.
pub fn poll_until<T>(
    deadline: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some((v, start.elapsed()));
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// Why this machine cannot have the bed, if it cannot.
fn preflight() -> Result<()> {
    let missing = |what: String| Err(Error::NoTestBed(what));
    if !nix::unistd::geteuid().is_root() {
        return missing("the GlusterFS bed needs root (glusterd, FUSE mounts, network namespaces)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return missing("no /dev/fuse".into());
    }
    for program in ["glusterd", "glusterfs", "gluster"] {
        if crate::real::find_program(program, None).is_err()
            && !Path::new("/usr/sbin").join(program).is_file()
        {
            return missing(format!(
                "{program} not found (apt-get install glusterfs-server glusterfs-client)"
            ));
        }
    }
    for program in ["ip", "nsenter", "umount"] {
        if crate::real::find_program(program, None).is_err()
            && !Path::new("/usr/sbin").join(program).is_file()
        {
            return missing(format!("{program} not found (iproute2, util-linux)"));
        }
    }
    Ok(())
}

fn skip_if_no_netns(e: Error) -> Error {
    match e {
        Error::Io { source, .. } if source.to_string().contains("Operation not permitted") => {
            Error::NoTestBed(format!("cannot create network namespaces here: {source}"))
        }
        e => e,
    }
}

/// A new, empty state directory with an unused id.
fn fresh_dir() -> Result<(String, PathBuf)> {
    loop {
        let n = STARTED.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{id}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            // A leftover of an earlier process with the same pid: `cargo xtask gluster down`.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::Io { what: "creating the bed's directory", source: e }),
        }
    }
}

fn step_error(what: &str, dir: &Path) -> Error {
    Error::Io {
        what: "building the GlusterFS bed",
        source: io::Error::other(format!("{what} (logs in {})", dir.join("log").display())),
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Runs `cmd` to completion (at most [`STEP`]), with `PATH` extended by `/usr/sbin`; its stderr
/// becomes the error when it fails.
fn run(cmd: &mut Command) -> Result<Output> {
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{path}:/usr/sbin:/sbin"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{:?}", cmd).replace('"', "");
    let child = cmd.spawn().map_err(|e| Error::Io {
        what: "starting a bed command",
        source: io::Error::new(e.kind(), format!("{what}: {e}")),
    })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(STEP) {
        Ok(out) => out.map_err(Error::io("waiting for a bed command"))?,
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            return Err(Error::Io { what: "a bed command hung", source: io::Error::other(what) });
        }
    };
    if !out.status.success() {
        let msg = format!(
            "{what}: {} {}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        return Err(Error::Io { what: "a bed command failed", source: io::Error::other(msg) });
    }
    Ok(out)
}

/// Whether `dir` is a mount point in this mount namespace.
fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let dir = dir.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&dir))
}

fn read_pid(file: &Path) -> Option<u32> {
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Alive and not a zombie.
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command, which may itself hold ") ".
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).is_some_and(|s| s != 'Z' && s != 'X')
}

fn cmdline(pid: u32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Live processes whose command line names `dir` (or a path below it).
fn processes_naming(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let needle = dir.display().to_string();
    let Ok(proc) = fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = proc
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&p: &u32| p != me)
        .filter(|&p| {
            let args = cmdline(p);
            // Daemons only: not a test or shell that merely mentions the path.
            args.first().is_some_and(|a| a.rsplit('/').next().is_some_and(|n| n.starts_with("gluster")))
                && args.iter().any(|a| {
                    a == &needle || a.starts_with(&format!("{needle}/")) || a.contains(&format!("{needle}/"))
                })
        })
        .filter(|&p| is_alive(p))
        .collect();
    pids.sort_unstable();
    pids
}

/// Waits (bounded) until none of `pids` is alive; whether they all went.
fn wait_gone(pids: &[u32], deadline: Duration) -> bool {
    poll_until(deadline, Duration::from_millis(20), || pids.iter().all(|&p| !is_alive(p)).then_some(()))
        .is_some()
}
