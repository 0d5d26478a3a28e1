//! QEMU builds to run against: where their binaries are and how to start them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use qlock_testkit::{FakeQemu, HolderBuilder};

/// The command-line tools every build must have.
pub const TOOLS: [&str; 4] = ["qemu-io", "qemu-img", "qemu-nbd", "qemu-storage-daemon"];

/// One QEMU build: its tools, and optionally `qemu-system-x86_64` for a paused VM.
#[derive(Debug, Clone)]
pub struct QemuBuild {
    /// Where it came from, for the report (`PATH`, `bookworm`, a directory).
    pub origin: String,
    /// `10.0.2`, from `qemu-io --version`.
    pub version: String,
    /// The directory holding the tools; `None` means "search PATH".
    pub bin_dir: Option<PathBuf>,
    /// `LD_LIBRARY_PATH` for this build's binaries only (unpacked libraries).
    pub lib_path: Option<OsString>,
    /// `QEMU_MODULE_DIR` for an unpacked qemu-system (accelerators are modules).
    pub module_dir: Option<PathBuf>,
    /// `qemu-system-x86_64`, or why there is none.
    pub system: Result<PathBuf, String>,
}

impl QemuBuild {
    /// The build on `PATH`.
    ///
    /// # Errors
    /// When a tool is missing or does not run.
    pub fn from_path() -> Result<QemuBuild, String> {
        QemuBuild::probe("PATH".into(), None, None, None)
    }

    /// A build whose tools live in `dir` (a `bin` directory, or a prefix containing `bin/`).
    ///
    /// # Errors
    /// When a tool is missing or does not run.
    pub fn from_dir(dir: &Path) -> Result<QemuBuild, String> {
        let bin = if dir.join("bin/qemu-io").exists() { dir.join("bin") } else { dir.to_path_buf() };
        QemuBuild::probe(dir.display().to_string(), Some(bin), None, None)
    }

    /// Checks the tools, reads the version and looks for `qemu-system-x86_64`.
    pub(crate) fn probe(
        origin: String,
        bin_dir: Option<PathBuf>,
        lib_path: Option<OsString>,
        module_dir: Option<PathBuf>,
    ) -> Result<QemuBuild, String> {
        let mut build = QemuBuild {
            origin,
            version: String::new(),
            bin_dir,
            lib_path,
            module_dir,
            system: Err(String::new()),
        };
        for tool in TOOLS {
            let path = build.tool_path(tool).ok_or_else(|| format!("{tool} not found"))?;
            if tool == "qemu-io" {
                build.version = version_of(&build, &path)?;
            }
        }
        build.system = match build.tool_path("qemu-system-x86_64") {
            None => Err("no qemu-system-x86_64 in this build".into()),
            Some(path) => match version_of(&build, &path) {
                Ok(v) if v == build.version => Ok(path),
                Ok(v) => Err(format!("qemu-system-x86_64 is {v}, the tools are {}", build.version)),
                Err(e) => Err(e),
            },
        };
        Ok(build)
    }

    /// Where `tool` is, if it exists.
    pub fn tool_path(&self, tool: &str) -> Option<PathBuf> {
        match &self.bin_dir {
            Some(dir) => Some(dir.join(tool)).filter(|p| p.is_file()),
            None => std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(|d| d.join(tool))
                .find(|p| p.is_file()),
        }
    }

    /// A command for one of this build's binaries, with its environment.
    pub fn command(&self, tool: &str) -> Command {
        let program = match tool {
            "qemu-system-x86_64" => self.system.clone().unwrap_or_else(|_| tool.into()),
            _ => self.tool_path(tool).unwrap_or_else(|| tool.into()),
        };
        self.command_at(&program)
    }

    /// A command for `program` with this build's environment.
    pub fn command_at(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some(lib) = &self.lib_path {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
        if let Some(dir) = &self.module_dir {
            cmd.env("QEMU_MODULE_DIR", dir);
        }
        // Messages are compared verbatim: keep them in English.
        cmd.env("LC_ALL", "C");
        cmd
    }

    /// A qlock-testkit holder of `image` whose real QEMU processes are this build's, with the
    /// same environment as [`command_at`](Self::command_at).
    pub fn holder(&self, image: &Path) -> HolderBuilder {
        let mut b = FakeQemu::builder(image).qemu_env("LC_ALL", "C");
        if let Some(dir) = &self.bin_dir {
            b = b.qemu_bin_dir(dir);
        }
        if let Some(lib) = &self.lib_path {
            b = b.qemu_env("LD_LIBRARY_PATH", lib);
        }
        if let Some(dir) = &self.module_dir {
            b = b.qemu_env("QEMU_MODULE_DIR", dir);
        }
        b
    }

    /// `10.0.2 (PATH)`
    pub fn label(&self) -> String {
        format!("{} ({})", self.version, self.origin)
    }
}

fn version_of(build: &QemuBuild, path: &Path) -> Result<String, String> {
    let out =
        build.command_at(path).arg("--version").output().map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("{} --version failed: {}", path.display(), String::from_utf8_lossy(&out.stderr)));
    }
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("{}: no version in {text:?}", path.display()))
}
