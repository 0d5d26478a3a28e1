//! `qlock status` naming every opener (table and schema-1 JSON, also with `--chain`), and
//! `--strict` refusing an unlocked writer in `check`, `wait` and `run`, against real QEMU
//! (`locking=off`) and real processes, each ready on its own output.

mod common;

use std::process::Command;

use common::{QLOCK, qcow2, qlock, raw, stderr, stdout};
use qlock_testkit::{FakeQemu, ReadyChild, TempImage, require};
use serde_json::Value;

/// `qemu-io` on `img` with `locking=off`: writes the image, leaves no lock byte.
fn qemu_locking_off(img: &TempImage) -> ReadyChild {
    let opts = format!(
        "driver={},file.driver=file,file.filename={},file.locking=off",
        img.format().as_str(),
        img.path().display()
    );
    let mut cmd = Command::new("qemu-io");
    cmd.args(["--image-opts", &opts]);
    ReadyChild::spawn(cmd, "qemu-io> ").expect("qemu-io with locking=off")
}

fn json(args: &[&str], img: &TempImage) -> Value {
    let o = qlock(args, img.path());
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("JSON")
}

#[test]
fn status_names_an_unlocked_qemu_with_its_label_and_json_schema_1() {
    require!("qemu-io", "qemu-img");
    let img = qcow2();
    let qemu = qemu_locking_off(&img);
    let o = qlock(&["status"], img.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    let row = table.lines().find(|l| l.starts_with("opener") && l.contains(&format!("pid {} ", qemu.pid())));
    let row = row.unwrap_or_else(|| panic!("no opener row for qemu-io: {table}"));
    assert!(row.contains("(qemu-io) fd ") && row.contains(" rw, up "), "{row}");
    assert!(row.contains("open for writing with no lock: QEMU with locking=off"), "{row}");

    let o = qlock(&["status", "--json"], img.path());
    let text = stdout(&o);
    assert!(text.starts_with("{\n  \"schema\": 1,\n  \"images\": ["), "schema first: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema"], 1);
    let image = &v["images"][0];
    assert_eq!(image["perm_bytes"], serde_json::json!([]), "no lock byte");
    let openers = image["openers"].as_array().unwrap();
    let q = openers.iter().find(|o| o["pid"] == qemu.pid()).unwrap_or_else(|| panic!("{image}"));
    assert_eq!(q["command"], "qemu-io");
    assert_eq!(q["mode"], "rw");
    assert_eq!(q["locks"], false);
    assert_eq!(q["class"], "unlocked-rw");
    assert!(q["label"].as_str().unwrap().contains("locking=off"));
    assert!(q["fd"].as_u64().is_some() && q["age_secs"].as_u64().is_some(), "{q}");
    for key in ["unit", "vm", "cgroup", "uid", "flock", "ranges", "qemu_name", "machine"] {
        assert!(q.get(key).is_some(), "{key} missing: {q}");
    }
    assert!(image["unreadable_processes"].as_u64().is_some());
}

#[test]
fn status_labels_a_force_share_reader_and_a_qemu_holder() {
    require!("qemu-io", "qemu-img");
    let img = qcow2();
    let reader = common::real(&img, qlock_testkit::FrontEnd::QemuIoForceShare);
    let v = json(&["status", "--json"], &img);
    let o = v["images"][0]["openers"].as_array().unwrap().iter().find(|o| o["pid"] == reader.pid()).cloned();
    let o = o.unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        (o["class"].as_str(), o["mode"].as_str(), o["locks"].as_bool()),
        (Some("force-share"), Some("ro"), Some(true))
    );
    drop(reader);
    let writer = common::real(&img, qlock_testkit::FrontEnd::QemuIoRw);
    let v = json(&["status", "--json"], &img);
    let o = v["images"][0]["openers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["pid"] == writer.pid())
        .cloned()
        .unwrap();
    assert_eq!(o["class"], "qemu");
    assert_eq!(o["uses"], serde_json::json!(["consistent-read", "write", "resize"]));
    assert_eq!(o["refuses"], serde_json::json!(["write", "resize"]));
}

#[test]
fn status_chain_shows_the_openers_of_every_node() {
    require!("qemu-io", "qemu-img");
    let base = qcow2();
    let top = base.path().with_file_name("top.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base.path())
        .arg(&top)
        .status()
        .unwrap();
    assert!(made.success());
    let qemu = qemu_locking_off(&base);
    let o = Command::new(QLOCK).args(["status", "--chain", "--json"]).arg(&top).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["schema"], 1);
    let chain = v["images"][0]["chain"].as_array().unwrap();
    let node = chain.iter().find(|n| n["role"] == "backing").unwrap_or_else(|| panic!("{v}"));
    assert!(
        node["openers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["pid"] == qemu.pid() && o["class"] == "unlocked-rw"),
        "{node}"
    );
    let o = Command::new(QLOCK).args(["status", "--chain"]).arg(&top).output().unwrap();
    assert!(stdout(&o).contains(&format!("opener        pid {} (qemu-io)", qemu.pid())), "{}", stdout(&o));
}

#[test]
fn check_strict_refuses_an_unlocked_writer_and_only_that() {
    let img = raw();
    // No writer: 0 with or without --strict.
    let reader = FakeQemu::builder(img.path()).raw([]).spawn().unwrap(); // read-only, no lock
    assert_eq!(qlock(&["check", "--strict", "--access", "write"], img.path()).status.code(), Some(0));
    drop(reader);
    let writer = FakeQemu::builder(img.path()).raw([]).writable(true).spawn().unwrap();
    assert_eq!(
        qlock(&["check", "--access", "write"], img.path()).status.code(),
        Some(0),
        "the locks say free"
    );
    let o = qlock(&["check", "--strict", "--access", "read"], img.path());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    let path = img.path().display();
    assert!(
        err.starts_with(&format!(
            "qlock: {path}: Image is open read-write without a lock by pid {} (qemu-fake) fd ",
            writer.pid()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("\nIs another process using the image [{path}]?\nhint: --strict counts")),
        "{err}"
    );
    assert!(stdout(&o).is_empty());
    drop(writer);
    assert_eq!(qlock(&["check", "--strict", "--access", "read"], img.path()).status.code(), Some(0));
}

#[test]
fn wait_and_run_strict_wait_for_the_unlocked_writer_to_go() {
    require!("qemu-io", "qemu-img");
    let img = qcow2();
    let qemu = qemu_locking_off(&img);
    // Refused while it runs: at once without waiting, at the deadline with one.
    let o = Command::new(QLOCK)
        .args(["run", "--strict", "--access", "read"])
        .arg(img.path())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(o.status.code() == Some(1) && stderr(&o).contains("without a lock by pid"), "{}", stderr(&o));
    let o = Command::new(QLOCK)
        .args(["wait", "--strict", "--access", "read", "--timeout", "0.3"])
        .arg(img.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("qlock: Timed out after "), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains(&format!("Image is open read-write without a lock by pid {} (qemu-io)", qemu.pid()))
    );
    // A waiter that is seen waiting on it (its debug log) gets in once it is gone.
    let mut waiter = Command::new(QLOCK)
        .env("QLOCK_LOG", "debug")
        .args(["run", "--wait", "--strict", "--access", "read", "--timeout", "60"])
        .arg(img.path())
        .args(["--", "true"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::Lines::from_reader(waiter.stderr.take().unwrap());
    let want = format!("unlocked writer pid {}", qemu.pid());
    while !lines.next().unwrap_or_else(|| panic!("the waiter ended before waiting")).contains(&want) {}
    drop(qemu);
    assert_eq!(waiter.wait().unwrap().code(), Some(0));
}
