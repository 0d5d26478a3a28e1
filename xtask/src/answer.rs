//! What a command was told about locks, read from its exit status and stderr, for the
//! sections of the compat run that compare the `qlock` binary with real QEMU commands
//! ([`crate::chains`], [`crate::iotest153`]).
//!
//! The comparison is the one a script makes: exit 0 or not, and the lock message. The message
//! keeps QEMU's `Could not open backing file: ` prefixes (they say which node refused) and the
//! `Is another process using the image [...]?` hint; only the tool's own name and, when asked,
//! the opening prefix, which differs between tools for the same refusal (`can't open device
//! X: ` in `qemu-io`, `Could not open 'X': ` in `qemu-img` and `qlock`, `--blockdev OPTS: ` in
//! `qemu-storage-daemon`), are cut.

use crate::compat::Compared;

/// What a command got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Exit 0: past locking.
    Granted,
    /// Refused on a lock: the message from after the tool's name, hint line included.
    Refused(String),
    /// A non-zero exit with no lock message: refused before any lock (an option the tool does
    /// not take, `-U` on a read-write open). Two of these agree.
    NotLocks(String),
    /// The run itself went wrong (could not be started, a QEMU error after locking): never
    /// agrees with anything.
    Broken(String),
}

impl Answer {
    /// Reads a tool's outcome. A lock message wins over the exit status (`qemu-io -c open`
    /// may go on after a refused open). `after_locks` lists messages that can only come once
    /// the image was opened and locked: a run ending with one of them got past locking.
    pub fn from_output(success: bool, stderr: &str, after_locks: &[&str]) -> Answer {
        let lines: Vec<&str> = stderr.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !(line.contains("Failed to get ") || line.contains("Failed to lock byte")) {
                continue;
            }
            let mut msg = without_tool(line).trim_end().to_string();
            if let Some(hint) = lines.get(i + 1).filter(|l| l.starts_with("Is another process using")) {
                msg.push('\n');
                msg.push_str(hint.trim_end());
            }
            return Answer::Refused(msg);
        }
        let first = lines.iter().map(|l| without_tool(l).trim()).find(|l| !l.is_empty());
        match (success, first) {
            (true, _) => Answer::Granted,
            (false, Some(l)) if after_locks.iter().any(|m| l.contains(m)) => Answer::Granted,
            (false, Some(l)) => Answer::NotLocks(l.to_string()),
            (false, None) => Answer::Broken("failed without a message".into()),
        }
    }

    /// The `qlock` binary's outcome: exit 0 granted, 1 refused with its message, 2 a question
    /// with no answer (refused before locks), anything else broken.
    pub fn from_qlock(code: Option<i32>, stderr: &str) -> Answer {
        let text = stderr.trim_end();
        let msg = || {
            let lines: Vec<&str> =
                text.lines().map(without_tool).filter(|l| !l.starts_with("Held by")).collect();
            lines.join("\n")
        };
        match code {
            Some(0) => Answer::Granted,
            Some(1) if text.contains("Failed to get ") || text.contains("Failed to lock byte") => {
                Answer::Refused(msg())
            }
            Some(2) => Answer::NotLocks(msg()),
            other => Answer::Broken(format!("exit {other:?}: {}", msg())),
        }
    }

    /// The same answer with the opening prefix of a refusal cut (`can't open device X: `,
    /// `Could not open 'X': `, `--blockdev OPTS: `), for comparing tools that word it
    /// differently.
    pub fn without_opening(self) -> Answer {
        match self {
            Answer::Refused(m) => Answer::Refused(without_opening(&m).to_string()),
            other => other,
        }
    }

    /// The same answer with `from` replaced by `to` in its message (a scratch directory).
    pub fn replace(self, from: &str, to: &str) -> Answer {
        match self {
            Answer::Refused(m) => Answer::Refused(m.replace(from, to)),
            Answer::NotLocks(m) => Answer::NotLocks(m.replace(from, to)),
            Answer::Broken(m) => Answer::Broken(m.replace(from, to)),
            Answer::Granted => Answer::Granted,
        }
    }

    /// One character for the matrices (the compat legend's, plus `n` for "refused before any
    /// lock").
    pub fn symbol(&self) -> char {
        match self {
            Answer::Granted => '.',
            Answer::Refused(m) if m.contains("Failed to lock byte") => 'L',
            Answer::Refused(m) if m.contains("Failed to get shared") => 's',
            Answer::Refused(_) => 'g',
            Answer::NotLocks(_) => 'n',
            Answer::Broken(_) => 'E',
        }
    }
}

impl Compared for Answer {
    /// Same exit class and, when refused, the same message; a broken run agrees with nothing.
    fn agrees(&self, other: &Answer) -> bool {
        match (self, other) {
            (Answer::Broken(_), _) | (_, Answer::Broken(_)) => false,
            (Answer::NotLocks(_), Answer::NotLocks(_)) | (Answer::Granted, Answer::Granted) => true,
            (a, b) => a == b,
        }
    }

    fn describe(&self) -> String {
        match self {
            Answer::Granted => "granted".into(),
            Answer::Refused(m) => format!("refused: {}", m.replace('\n', " / ")),
            Answer::NotLocks(m) => format!("refused before locking: {m}"),
            Answer::Broken(m) => format!("error: {m}"),
        }
    }
}

/// `qemu-img: X` → `X` (also `qemu-io: `, `qlock: `, `qemu-storage-daemon: `, ...).
fn without_tool(line: &str) -> &str {
    for tool in ["qemu-img: ", "qemu-io: ", "qlock: ", "qemu-storage-daemon: ", "qemu-system-x86_64: "] {
        if let Some(rest) = line.strip_prefix(tool) {
            return rest;
        }
    }
    line
}

fn without_opening(msg: &str) -> &str {
    if let Some(rest) = msg.strip_prefix("can't open device ") {
        return rest.split_once(": ").map_or(rest, |(_, m)| m);
    }
    if let Some(rest) = msg.strip_prefix("Could not open '") {
        return rest.split_once("': ").map_or(rest, |(_, m)| m);
    }
    if msg.starts_with("--blockdev ") || msg.starts_with("-drive ") {
        return msg.split_once(": ").map_or(msg, |(_, m)| m);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::Answer;
    use crate::compat::Compared;

    #[test]
    fn each_tool_words_the_same_refusal_alike_once_the_opening_is_cut() {
        let hint = "\nIs another process using the image [b.qcow2]?";
        let io = "qemu-io: can't open device t.qcow2: Could not open backing file: Failed to get shared \"write\" lock\nIs another process using the image [b.qcow2]?\nno file open, try 'help open'\n";
        let img = "qemu-img: Could not open 't.qcow2': Could not open backing file: Failed to get shared \"write\" lock\nIs another process using the image [b.qcow2]?\n";
        let qsd = "qemu-storage-daemon: --blockdev driver=qcow2,file.filename=t.qcow2: Could not open backing file: Failed to get shared \"write\" lock\nIs another process using the image [b.qcow2]?\n";
        let qlock = "qlock: Could not open 't.qcow2': Could not open backing file: Failed to get shared \"write\" lock\nIs another process using the image [b.qcow2]?\nHeld by pid 1 (qemu-io) fd 3 OFD: 100 101 | -\n";
        let want = Answer::Refused(format!(
            "Could not open backing file: Failed to get shared \"write\" lock{hint}"
        ));
        for (what, a) in [
            ("io", Answer::from_output(true, io, &[])),
            ("img", Answer::from_output(false, img, &[])),
            ("qsd", Answer::from_output(false, qsd, &[])),
            ("qlock", Answer::from_qlock(Some(1), qlock)),
        ] {
            assert_eq!(a.without_opening(), want, "{what}");
        }
        // qemu-img and qlock also agree before the cut.
        assert!(Answer::from_output(false, img, &[]).agrees(&Answer::from_qlock(Some(1), qlock)));
    }

    #[test]
    fn refusals_before_locks_agree_with_each_other_only() {
        let usage = Answer::from_output(false, "qemu-img commit: invalid option -- 'U'\n", &[]);
        let qlock = Answer::from_qlock(Some(2), "qlock: qemu-img commit has no -U option\n");
        assert!(matches!(usage, Answer::NotLocks(_)));
        assert!(usage.agrees(&qlock));
        assert!(!usage.agrees(&Answer::Granted));
        assert!(!Answer::Broken("x".into()).agrees(&Answer::Broken("x".into())));
        let late = Answer::from_output(
            false,
            "qemu-img: Image does not have a backing file\n",
            &["does not have a backing file"],
        );
        assert_eq!(late, Answer::Granted);
        assert!(matches!(Answer::from_qlock(Some(1), "qlock: something else"), Answer::Broken(_)));
    }
}
