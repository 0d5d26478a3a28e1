//! What every `qlock` binary test needs: the binary, images, real QEMU holders, output helpers.
#![allow(dead_code, unreachable_pub)] // each test file uses a different part

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use qlock_testkit::{FakeQemu, Format, FrontEnd, TempImage};

pub const QLOCK: &str = env!("CARGO_BIN_EXE_qlock");

pub fn qcow2() -> TempImage {
    TempImage::new(Format::Qcow2).expect("qemu-img create")
}

pub fn raw() -> TempImage {
    TempImage::new(Format::Raw).expect("raw image")
}

/// A real QEMU front end holding `img`, through the testkit: ready once its prompt showed.
pub fn real(img: &TempImage, front_end: FrontEnd) -> FakeQemu {
    FakeQemu::real(img, front_end, img.format()).unwrap_or_else(|e| panic!("real {front_end}: {e}"))
}

/// A qcow2 image a real `qemu-io` holds read-write (as a running VM's disk does), and that
/// holder; `None` without QEMU (the test skips, or fails under `CI=true`).
pub fn held_by_qemu_io() -> Option<(TempImage, FakeQemu)> {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let img = qcow2();
    let vm = real(&img, FrontEnd::QemuIoRw);
    Some((img, vm))
}

pub fn qlock(args: &[&str], image: &Path) -> Output {
    Command::new(QLOCK).args(args).arg(image).output().expect("run qlock")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Reads `child`'s stdout lines on a thread, so a test can wait for a handshake line with a
/// deadline that fails the test instead of hanging it.
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    pub fn of(child: &mut Child) -> Lines {
        Lines::from_reader(child.stdout.take().expect("stdout piped"))
    }

    pub fn from_reader(out: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    /// The next line; `None` at end of file. Panics after a minute: something is stuck.
    pub fn next(&self) -> Option<String> {
        match self.0.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no line within a minute"),
        }
    }

    /// Waits for the line `want`, returning the lines before it.
    pub fn until(&self, want: &str) -> Vec<String> {
        let mut before = Vec::new();
        loop {
            match self.next() {
                Some(l) if l.trim_end_matches('\r') == want => return before,
                Some(l) => before.push(l),
                None => panic!("end of output before {want:?}: {before:?}"),
            }
        }
    }
}
