//! `qlock run` as a process supervisor: signals, a killed qlock, command arguments.

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lines, QLOCK, qlock, raw, stderr, stdout};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;

/// `SigBlk` and `SigIgn` of a process started through `sh -c "trap '' TRAPS; exec ..."`.
fn signal_state(traps: &str, argv: &[&OsStr]) -> String {
    let wrapper = format!("trap '' {traps}; exec \"$@\"");
    let o = Command::new("sh").args(["-c", &wrapper, "sh"]).args(argv).output().expect("sh");
    assert!(o.status.success(), "{argv:?}: {}", stderr(&o));
    stdout(&o)
}

fn mask_bits(state: &str, field: &str) -> u64 {
    let line = state.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in {state}"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

fn bit(sig: Signal) -> u64 {
    1 << (sig as u64 - 1)
}

#[test]
fn the_command_starts_with_the_signal_mask_and_dispositions_qlock_started_with() {
    let img = raw();
    let grep = ["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"].map(OsStr::new);
    let mut through = vec![OsStr::new(QLOCK), "run".as_ref(), img.path().as_os_str()];
    through.extend(["--access", "read", "--"].map(OsStr::new));
    through.extend(grep);
    // This thread's mask is what the spawned shell, then qlock, start with.
    let mut usr2 = SigSet::empty();
    usr2.add(Signal::SIGUSR2);
    usr2.thread_block().unwrap();
    // SIGPIPE both ways: Rust ignores it at startup, the command must not notice. INT and HUP
    // ignored as `nohup` and a shell's background jobs have them.
    for traps in ["USR1", "USR1 PIPE", "USR1 INT HUP QUIT TERM"] {
        let direct = signal_state(traps, &grep);
        assert_eq!(mask_bits(&direct, "SigBlk") & bit(Signal::SIGUSR2), bit(Signal::SIGUSR2), "{direct}");
        assert_ne!(mask_bits(&direct, "SigIgn") & bit(Signal::SIGUSR1), 0, "{direct}");
        assert_eq!(signal_state(traps, &through), direct, "trap '' {traps}");
    }
    usr2.thread_unblock().unwrap();
}

/// `qlock run IMAGE --access read -- sh -c SCRIPT`, its stdout read line by line.
fn run_script(img: &std::path::Path, extra: &[&str], script: &str) -> (std::process::Child, Lines) {
    let mut child = Command::new(QLOCK)
        .arg("run")
        .arg(img)
        .args(extra)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn qlock");
    let lines = Lines::of(&mut child);
    (child, lines)
}

/// [`run_script`] with a `script` that says `ready` first; once it has, qlock itself (not the
/// command) is killed with SIGKILL and reaped. Returns the command's stdin, to keep open
/// (`Child::wait` would close it, and the command would read its end of file), and its lines.
fn kill_qlock_once_ready(img: &std::path::Path, extra: &[&str], script: &str) -> (ChildStdin, Lines) {
    let (mut qlock_run, lines) = run_script(img, extra, script);
    let stdin = qlock_run.stdin.take().unwrap();
    lines.until("ready");
    kill(Pid::from_raw(qlock_run.id() as i32), Signal::SIGKILL).unwrap();
    assert_eq!(qlock_run.wait().unwrap().signal(), Some(Signal::SIGKILL as i32));
    (stdin, lines)
}

#[test]
fn a_signal_to_qlock_reaches_the_command_at_once_and_qlock_exits_as_it_did() {
    let img = raw();
    for sig in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT, Signal::SIGQUIT] {
        // `ulimit -c 0`: SIGQUIT dumps core otherwise.
        let (mut qlock, lines) =
            run_script(img.path(), &["--access", "read"], "ulimit -c 0; echo ready; exec sleep 30");
        lines.until("ready");
        let sent = Instant::now();
        kill(Pid::from_raw(qlock.id() as i32), sig).unwrap();
        let status = qlock.wait().unwrap();
        assert_eq!(status.code(), Some(128 + sig as i32), "{sig}: {status:?}");
        assert!(sent.elapsed() < Duration::from_secs(20), "{sig} took {:?}", sent.elapsed());
    }
}

#[test]
fn ctrl_c_on_a_terminal_interrupts_the_command() {
    let img = raw();
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = File::from(pty.slave);
    // `setsid -c`: a new session whose controlling terminal is the pty, qlock in its
    // foreground process group, as when a user types the command.
    let mut qlock = {
        let mut cmd = Command::new("setsid");
        cmd.args(["-c", QLOCK, "run"])
            .arg(img.path())
            .args(["--access", "read", "--", "sh", "-c", "echo ready; exec sleep 30"])
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        cmd.spawn().expect("setsid (util-linux)")
    };
    let mut master = File::from(pty.master);
    let lines = Lines::from_reader(master.try_clone().unwrap());
    lines.until("ready");
    let typed = Instant::now();
    master.write_all(b"\x03").unwrap();
    let status = qlock.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(typed.elapsed() < Duration::from_secs(20), "Ctrl-C took {:?}", typed.elapsed());
}

/// Nobody holds `img` any more: `qlock check --access write` gets in.
fn assert_free(img: &std::path::Path, when: &str) {
    let o = qlock(&["check", "--access", "write"], img);
    assert_eq!(o.status.code(), Some(0), "free {when}: {}", stderr(&o));
}

#[test]
fn a_killed_qlock_leaves_the_locks_with_the_command_until_it_exits() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let img = raw();
    let (mut stdin, lines) =
        kill_qlock_once_ready(img.path(), &["--access", "write"], "echo ready; read line; echo bye");

    // qlock is gone; the command still holds the image, against qlock and against QEMU.
    let o = qlock(&["check", "--access", "read"], img.path());
    assert_eq!(o.status.code(), Some(1), "still locked while the command lives: {}", stderr(&o));
    assert!(stderr(&o).contains("(sh)"), "the command is the holder: {}", stderr(&o));
    let qemu = Command::new("qemu-io").args(["-f", "raw", "-c", "quit"]).arg(img.path()).output().unwrap();
    assert!(stderr(&qemu).contains("Failed to get \"write\" lock"), "{}", stderr(&qemu));

    // The command exits: the image is free.
    stdin.write_all(b"go\n").unwrap();
    assert_eq!(lines.next().as_deref(), Some("bye"));
    assert_eq!(lines.next(), None, "the command has exited");
    assert_free(img.path(), "once the command exited");
}

#[test]
fn with_close_a_killed_qlock_takes_the_command_with_it() {
    let img = raw();
    let (_stdin, lines) =
        kill_qlock_once_ready(img.path(), &["--access", "write", "--close"], "echo ready; read line");
    // The command never gets its line (the test keeps stdin open): its stdout ends only
    // because it died with qlock.
    assert_eq!(lines.next(), None, "the command outlived qlock");
    assert_free(img.path(), "once qlock and the command are gone");
}

#[test]
fn command_arguments_need_not_be_utf8() {
    let img = raw();
    let o = Command::new(QLOCK)
        .arg("run")
        .arg(img.path())
        .args(["--access", "read", "--", "sh", "-c", "printf %s \"$1\"", "sh"])
        .arg(OsStr::from_bytes(b"\xff\xfe"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(o.stdout, b"\xff\xfe");
    // And image names need not be either.
    let odd = img.path().with_file_name(OsStr::from_bytes(b"d\xff.img"));
    std::fs::copy(img.path(), &odd).unwrap();
    let o = Command::new(QLOCK)
        .args(["run", "--access", "read"])
        .arg(&odd)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
