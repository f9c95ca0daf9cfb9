//! The virtual environments of the PyPI test peers (aiocoap, schemathesis): where each lives
//! under the target directory, and creating one and installing a requirements file into it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `<target dir>/tmp/<name>`: the target directory is `CARGO_TARGET_DIR`, else the one the
/// running binary was built into (marked by cargo's `CACHEDIR.TAG`), else the workspace's.
pub(crate) fn venv_dir(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            exe.ancestors()
                .find(|dir| dir.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("tmp").join(name)
}

/// Creates the virtual environment `venv` (again over a broken one) and installs
/// `requirements` into it; the error says which step failed.
pub(crate) fn create_and_install(venv: &Path, requirements: &Path) -> Result<(), String> {
    let created = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(venv)
        .status();
    if !created.is_ok_and(|s| s.success()) {
        return Err("python3 -m venv failed (Debian: apt-get install python3-venv)".into());
    }
    let installed = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(requirements)
        .status();
    if !installed.is_ok_and(|s| s.success()) {
        return Err(format!("pip install -r {} failed", requirements.display()));
    }
    Ok(())
}
