//! `cargo xtask gluster up | down | status`: the two-host GlusterFS bed by hand.
//!
//! The bed itself is qlock-testkit's [`GlusterBed`] (the tests use it directly, and it tears
//! itself down when dropped); this task keeps one running to look at, e.g. to run `qlock` or
//! `qemu-io` on both mounts, and tears down beds later, also those a killed test left behind.

use qlock_testkit::gluster::GlusterBed;

/// Starts a bed with volume `options` (`KEY=VALUE`), prints its mounts and id, and leaves it
/// running.
///
/// # Errors
/// A malformed option, or why the bed could not be built (nothing is left behind then).
pub fn up(options: &[String]) -> Result<(), String> {
    let options = options
        .iter()
        .map(|o| o.split_once('=').ok_or_else(|| format!("--set {o}: expected KEY=VALUE")))
        .collect::<Result<Vec<_>, _>>()?;
    let started = std::time::Instant::now();
    let bed = GlusterBed::start_with(&options).map_err(|e| e.to_string())?;
    println!("gluster: bed {} up in {:.1}s", bed.id(), started.elapsed().as_secs_f64());
    print!("{}", describe(&bed));
    let id = bed.keep();
    println!("tear down with: cargo xtask gluster down {id}");
    Ok(())
}

/// Tears down the beds named, or every bed whose state directory exists.
///
/// # Errors
/// What could not be undone.
pub fn down(ids: &[String]) -> Result<(), String> {
    let ids = if ids.is_empty() { GlusterBed::list() } else { ids.to_vec() };
    let mut failed = Vec::new();
    for id in &ids {
        let problems = GlusterBed::down(id);
        let left = GlusterBed::leftovers(id);
        if problems.is_empty() && left.is_empty() {
            println!("gluster: bed {id} torn down");
        }
        failed.extend(problems.into_iter().chain(left).map(|p| format!("bed {id}: {p}")));
    }
    if ids.is_empty() {
        println!("gluster: no bed");
    }
    if failed.is_empty() { Ok(()) } else { Err(failed.join("\n")) }
}

/// Lists the beds and what each has running.
pub fn status() {
    let ids = GlusterBed::list();
    if ids.is_empty() {
        println!("gluster: no bed");
    }
    for id in ids {
        let left = GlusterBed::leftovers(&id);
        println!("bed {id}:");
        for item in left {
            println!("  {item}");
        }
    }
}

fn describe(bed: &GlusterBed) -> String {
    let mut s = format!("  volume {} (state in {})\n", bed.volume(), bed.dir().display());
    for host in [bed.host_a(), bed.host_b()] {
        s += &format!(
            "  host {}: {} (netns {}, client pid {})\n",
            host.name(),
            host.mount().display(),
            host.netns(),
            host.client_pid().map_or("-".into(), |p| p.to_string())
        );
    }
    s
}
