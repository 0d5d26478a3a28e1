//! The per-node rules (`qlock_core::graph::rules`) against every row QEMU was watched to lock
//! (`xtask/tests/graph_expected.txt`, asserted on real QEMU 10.0.2 and 7.2 by
//! `cargo test -p xtask --test graph`): the rules and the observations cannot drift apart.

use qlock_core::Perm;
use qlock_core::graph::rules::User;
use qlock_core::graph::{Format, Role};

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const WU: Perm = Perm::WRITE_UNCHANGED;
const RS: Perm = Perm::RESIZE;

fn user(perm: Perm, shared: Perm, writable: bool) -> User {
    User { perm, shared: shared | Perm::GRAPH_MOD, writable, force_share: false, no_io: false }
}

/// Each holder of the observation table as the user it is (written from what the front end
/// asks and shares on a raw image: the testkit's table, docs/protocol.md §5).
fn holder(label: &str) -> User {
    let all = Perm::ALL;
    match label {
        "qemu-io -f qcow2 top" => user(CR | W, all, true),
        "qemu-io -r -f qcow2 top" => user(CR, all, false),
        "qemu-io -r -U -f qcow2 top" => User { force_share: true, ..user(CR, all, false) },
        "q-s-d export writable=on" | "qemu-nbd -f qcow2 top" => user(CR | W, CR | W | WU, true),
        "q-s-d export writable=off (read-only=on)" | "qemu-nbd -r -f qcow2 top" => {
            user(CR, CR | W | WU, false)
        }
        "q-s-d --blockdev, no user" => User::nobody(true),
        // top is the backing file of a fresh qcow2 overlay that nobody attaches to
        "q-s-d --blockdev overlay over top" => User::nobody(true).backing(),
        "qemu-system -drive (VmDisk)" => user(CR | W, CR | WU | RS, true),
        "qemu-system -drive share-rw=on" => user(CR | W, all, true),
        "qemu-system -drive readonly=on" => user(CR, CR | WU | RS, false),
        other => panic!("holder {other:?} has no user here: add it"),
    }
}

/// `top`, `backing 2 qcow2`, `data-file` (with the graph's name for raw=on).
fn node(field: &str, graph: &str) -> (Role, Format) {
    let words: Vec<&str> = field.split_whitespace().collect();
    match words.as_slice() {
        ["top"] => (Role::Top, Format::Qcow2),
        ["data-file"] => (Role::DataFile { depth: 0, raw: graph == "data-file-raw" }, Format::Raw),
        ["backing", depth, format] => {
            let depth = depth.parse().expect("depth");
            let format = match *format {
                "qcow2" => Format::Qcow2,
                "raw" => Format::Raw,
                f => panic!("format {f}"),
            };
            (Role::Backing { depth }, format)
        }
        _ => panic!("node {field:?}"),
    }
}

fn shown(access: qlock_core::Access) -> String {
    let set = access.lock_set(Perm::ALL);
    // The table writes a node with no byte at all as a single `-`.
    if set.is_empty() { "-".into() } else { set.to_string() }
}

#[test]
fn the_rules_give_every_observed_row() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../xtask/tests/graph_expected.txt");
    let table = std::fs::read_to_string(path).expect("read the observation table");
    let mut rows = 0;
    let mut wrong = Vec::new();
    for line in table.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let fields: Vec<&str> = line.splitn(4, " | ").collect();
        let [label, graph, field, observed] = fields[..] else { panic!("row {line:?}") };
        let (role, format) = node(field, graph);
        let got = shown(holder(label).node(role, format));
        if got != observed {
            wrong.push(format!("{label} | {graph} | {field}: rules {got}, observed {observed}"));
        }
        rows += 1;
    }
    assert!(rows >= 180, "only {rows} rows read from {path}");
    assert!(wrong.is_empty(), "{} of {rows} rows differ:\n{}", wrong.len(), wrong.join("\n"));
}
