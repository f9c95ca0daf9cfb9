//! The Kubernetes manifests of `deploy/kubernetes` without a cluster: a kustomization rendered
//! into its resources, YAML read as Kubernetes reads it, and resources validated against the
//! Kubernetes JSON schemas, all through `testbed/peers/kubernetes/manifests.py` and the PyPI
//! package kubernetes-validate (installed into a virtual environment under the target directory
//! on first use, as the aiocoap peer is); and, where `kubectl` is installed, the same
//! kustomization built by the kustomize inside it, to hold the renderer to the real one.
//!
//! The calls here block (they run and wait for child processes), each with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The interpreter to use instead of the managed virtual environment (it must import
/// `kubernetes_validate` and `yaml`).
pub const PYTHON_VAR: &str = "KUBERNETES_VALIDATE_PYTHON";
/// The Kubernetes versions whose schemas the manifests must fit: the oldest and the newest that
/// the pinned kubernetes-validate (1.37.0) bundles.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];
/// How long one run of the tool may take (a run takes well under a second).
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot install kubernetes-validate into {venv}: {detail}")]
    Install { venv: PathBuf, detail: String },
    #[error("{command}: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} did not finish within {deadline:?}")]
    Timeout { command: String, deadline: Duration },
    #[error("{command} failed ({status}):\n{stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{command} printed no JSON array: {detail}")]
    Output { command: String, detail: String },
}

/// One resource checked against the schemas of one Kubernetes version.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Validation {
    /// `Kind/name`.
    pub resource: String,
    pub version: String,
    /// Why it does not fit, `None` when it does.
    pub error: Option<String>,
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/kubernetes")
}

/// `<target dir>/tmp/kubernetes-validate-venv` (see `python_venv::venv_dir`).
pub fn default_venv_dir() -> PathBuf {
    crate::python_venv::venv_dir("kubernetes-validate-venv")
}

/// The Python that runs `manifests.py`: [`PYTHON_VAR`], else the virtual environment, created
/// and filled from `testbed/peers/kubernetes/requirements.txt` on first use, once per process.
pub fn python() -> Result<PathBuf, KubernetesError> {
    static PYTHON: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(python) = std::env::var_os(PYTHON_VAR) {
                return Ok(PathBuf::from(python));
            }
            install(&default_venv_dir())
        })
        .clone()
        .map_err(|detail| KubernetesError::Install {
            venv: default_venv_dir(),
            detail,
        })
}

/// The `name==version` pins of the requirements file, as `(name, version)`.
fn pins(requirements: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(requirements)
        .map_err(|e| format!("{}: {e}", requirements.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once("=="))
        .filter(|(name, _)| !name.trim_start().starts_with('#'))
        .map(|(name, version)| (name.trim().to_owned(), version.trim().to_owned()))
        .collect())
}

/// Creates the virtual environment in `venv` and installs the requirements, unless every pinned
/// package is there at its pinned version already.
fn install(venv: &Path) -> Result<PathBuf, String> {
    let python = venv.join("bin/python");
    let requirements = peers_dir().join("requirements.txt");
    let pins = pins(&requirements)?;
    let check = format!(
        "import importlib.metadata as m, sys; sys.exit(any(m.version(n) != v for n, v in {pins:?}))"
    );
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", &check])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        tracing::info!(venv = %venv.display(), "installing kubernetes-validate into a virtual environment");
        crate::python_venv::create_and_install(venv, &requirements)?;
        if !ready(&python) {
            return Err(format!("{pins:?} are not installed after the install"));
        }
    }
    Ok(python)
}

/// What a finished command printed, and how it ended.
struct Finished {
    command: String,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// Its stdout if it succeeded.
    fn stdout(self) -> Result<String, KubernetesError> {
        if self.status.success() {
            Ok(self.stdout)
        } else {
            Err(KubernetesError::Failed {
                command: self.command,
                status: self.status,
                stderr: self.stderr,
            })
        }
    }
}

/// Runs `command` to its end within [`DEADLINE`]. Its output goes to files, so a large one
/// cannot block it.
fn run(command: &mut Command) -> Result<Finished, KubernetesError> {
    let name = format!("{command:?}");
    let io = |source| KubernetesError::Io {
        command: name.clone(),
        source,
    };
    let dir = tempfile::tempdir().map_err(io)?;
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).map_err(io)?)
        .stderr(std::fs::File::create(&err).map_err(io)?)
        .spawn()
        .map_err(io)?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io)? {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(KubernetesError::Timeout {
                command: name,
                deadline: DEADLINE,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Finished {
        status,
        stdout: std::fs::read_to_string(&out).map_err(io)?,
        stderr: std::fs::read_to_string(&err).map_err(io)?,
        command: name,
    })
}

/// `python manifests.py`, its arguments still to come.
fn manifests_py() -> Result<Command, KubernetesError> {
    let mut command = Command::new(python()?);
    command.arg(peers_dir().join("manifests.py"));
    Ok(command)
}

fn json_array<T: serde::de::DeserializeOwned>(
    command: &str,
    stdout: &str,
) -> Result<Vec<T>, KubernetesError> {
    serde_json::from_str(stdout).map_err(|e| KubernetesError::Output {
        command: command.to_owned(),
        detail: e.to_string(),
    })
}

/// The resources the kustomization in `dir` makes (`manifests.py render`).
pub fn render(dir: &Path) -> Result<Vec<Value>, KubernetesError> {
    let stdout = run(manifests_py()?.arg("render").arg(dir))?.stdout()?;
    json_array("manifests.py render", &stdout)
}

/// The YAML documents of `file`, read as Kubernetes reads YAML (`manifests.py load`).
pub fn load(file: &Path) -> Result<Vec<Value>, KubernetesError> {
    let stdout = run(manifests_py()?.arg("load").arg(file))?.stdout()?;
    json_array("manifests.py load", &stdout)
}

/// Every resource against the strict schemas of every version in `versions`. An invalid
/// resource is an `error` in its [`Validation`], not an `Err`.
pub fn validate(
    resources: &[Value],
    versions: &[&str],
) -> Result<Vec<Validation>, KubernetesError> {
    let dir = tempfile::tempdir().map_err(|source| KubernetesError::Io {
        command: "tempdir".into(),
        source,
    })?;
    let file = dir.path().join("resources.json");
    std::fs::write(&file, Value::from(resources.to_vec()).to_string()).map_err(|source| {
        KubernetesError::Io {
            command: format!("write {}", file.display()),
            source,
        }
    })?;
    let mut command = manifests_py()?;
    command.arg("validate");
    for version in versions {
        command.args(["-k", version]);
    }
    let finished = run(command.arg(&file))?;
    // Exit 1: some resource does not fit; the results are printed all the same.
    let stdout = if finished.status.code() == Some(1) {
        finished.stdout
    } else {
        finished.stdout()?
    };
    json_array("manifests.py validate", &stdout)
}

/// `kubectl kustomize dir`, read by [`load`]: `None` when no `kubectl` is on `PATH`.
pub fn kustomize_build(dir: &Path) -> Option<Result<Vec<Value>, KubernetesError>> {
    let kubectl = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("kubectl"))
            .find(|candidate| candidate.is_file())
    })?;
    let built = (|| {
        let mut command = Command::new(kubectl);
        command.arg("kustomize").arg(dir);
        let yaml = run(&mut command)?.stdout()?;
        let out = tempfile::NamedTempFile::new().map_err(|source| KubernetesError::Io {
            command: "tempfile".into(),
            source,
        })?;
        std::fs::write(out.path(), yaml).map_err(|source| KubernetesError::Io {
            command: format!("write {}", out.path().display()),
            source,
        })?;
        load(out.path())
    })();
    Some(built)
}
