//! What `qlock doctor` and `qlock status` say on a real GlusterFS volume (qlock-testkit's
//! `GlusterBed`: two FUSE clients, "host A" and "host B", of one volume): cluster scope, the
//! partition and reconnect hazards with the client's strict-locks setting read from its log,
//! and, on host B, host A's real `qemu-io` bytes reported as held elsewhere (another client of
//! this filesystem) instead of by an unknown holder.
//!
//! Needs root, FUSE, network namespaces and glusterfs-server + glusterfs-client (and qemu-io):
//! without them the tests skip, except under `CI=true`, where they fail. Holders are ready at
//! their prompt; only the release seen through the other mount is polled, with a deadline.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{image, qcow2, qlock, text};
use qlock_testkit::ReadyChild;
use qlock_testkit::gluster::{GlusterBed, poll_until};
use serde_json::{Value, json};

fn json_of(args: &[&str], image: &Path) -> Value {
    let out = qlock(args, image);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn doctor(image: &Path) -> Value {
    let v = json_of(&["doctor", "--json"], image);
    assert_eq!(v["schema"], 1);
    v["paths"][0].clone()
}

fn status(image: &Path) -> Value {
    json_of(&["status", "--json"], image)["images"][0].clone()
}

fn hazard<'a>(entry: &'a Value, id: &str) -> Option<&'a Value> {
    entry["hazards"].as_array()?.iter().find(|h| h["id"] == id)
}

#[test]
fn on_host_b_doctor_says_cluster_and_status_says_host_a_bytes_are_held_elsewhere() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (on_a, on_b) = qcow2(&bed, "vm.qcow2");

    // doctor on host B: the mount, cluster scope, both GlusterFS hazards; strict-locks is off
    // (the default), read from host B's client log.
    let d = doctor(&on_b);
    assert_eq!(d["filesystem"], "fuse.glusterfs", "{d}");
    assert_eq!(d["mount_point"], bed.host_b().mount().display().to_string(), "{d}");
    assert_eq!(d["mount_source"], format!("{}:{}", qlock_testkit::gluster::BRICK_ADDR, bed.volume()), "{d}");
    assert_eq!((d["lock_scope"].as_str(), d["ofd"].as_bool()), (Some("cluster"), Some(true)), "{d}");
    assert!(hazard(&d, "gluster-partition").is_some(), "{d}");
    let reconnect = hazard(&d, "gluster-reconnect").expect("the reconnect hazard");
    let log = bed.host_b().client_log().display().to_string();
    assert!(
        reconnect["text"].as_str().unwrap().contains(&format!("strict-locks off, from the client log {log}")),
        "{reconnect}"
    );
    let set = format!("gluster volume set {} client.strict-locks on", bed.volume());
    assert!(reconnect["advice"].as_str().unwrap().contains(&set), "{reconnect}");
    let table = text(&qlock(&["doctor"], &on_b).stdout);
    assert!(table.lines().any(|l| l.starts_with("lock scope    cluster (")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("hazard        gluster-reconnect: ")), "{table}");

    // Host A's real QEMU holds the image; host B sees its bytes, held by no process of its own.
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "qcow2"]).arg(&on_a);
    let qemu_a = ReadyChild::spawn(qemu_io, "qemu-io> ").expect("qemu-io on host A");
    let s = status(&on_b);
    assert_eq!(s["perm_bytes"], json!([100, 101, 103]), "{s}");
    assert_eq!(s["unshare_bytes"], json!([201, 203]), "{s}");
    assert_eq!(s["holders"], json!([]), "{s}");
    assert_eq!(s["lock_scope"], "cluster", "{s}");
    assert_eq!((s["unidentified"].as_bool(), s["held_elsewhere"].as_bool()), (Some(true), Some(true)), "{s}");
    let table = text(&qlock(&["status"], &on_b).stdout);
    let holders: Vec<&str> = table.lines().filter(|l| l.starts_with("holder")).collect();
    assert_eq!(holders, ["holder        held elsewhere (another client of this filesystem)"], "{table}");

    // On host A the same bytes are not "elsewhere": a process there has the image open (its
    // locks are forwarded to the brick, so /proc does not show them).
    let s = status(&on_a);
    assert_eq!(
        (s["lock_scope"].as_str(), s["held_elsewhere"].as_bool()),
        (Some("cluster"), Some(false)),
        "{s}"
    );
    assert!(!text(&qlock(&["status"], &on_a).stdout).contains("held elsewhere"));

    // Host A's QEMU quits: once host B sees the bytes free, nothing is held elsewhere.
    drop(qemu_a);
    poll_until(Duration::from_secs(10), Duration::from_millis(5), || {
        status(&on_b)["perm_bytes"].as_array().is_some_and(Vec::is_empty).then_some(())
    })
    .expect("host A's locks still seen on host B after qemu-io quit");
    assert_eq!(status(&on_b)["held_elsewhere"], false);
}

#[test]
fn doctor_reads_strict_locks_on_from_the_client_and_keeps_the_partition_hazard() {
    let Some(bed) = GlusterBed::start_or_skip_with(&[("client.strict-locks", "on")]) else { return };
    let (_, on_b) = image(&bed, "disk.img");
    let d = doctor(&on_b);
    assert_eq!(d["lock_scope"], "cluster", "{d}");
    assert!(hazard(&d, "gluster-reconnect").is_none(), "strict-locks is on: {d}");
    let partition = hazard(&d, "gluster-partition").expect("the partition hazard stays");
    assert!(partition["text"].as_str().unwrap().contains("strict-locks is on here"), "{partition}");
}
