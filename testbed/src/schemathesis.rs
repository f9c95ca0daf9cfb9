//! Driver of schemathesis (PyPI), the property-based HTTP API tester that checks a running
//! bridge against the project's own OpenAPI (`openapi/nidd-bridge.yaml`): the Python that runs
//! it (installed into a virtual environment under the target directory on first use, as the
//! aiocoap peer is) and one bounded run against one listener.
//!
//! The calls here block (they run and wait for a child process); async callers wrap them in
//! `tokio::task::spawn_blocking`. Every run has a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `st` executable to use instead of the managed virtual environment.
pub const ST_VAR: &str = "SCHEMATHESIS_ST";

#[derive(Debug, thiserror::Error)]
pub enum SchemathesisError {
    #[error("cannot install schemathesis into {venv}: {detail}")]
    Install { venv: PathBuf, detail: String },
    #[error("schemathesis: {0}")]
    Io(#[from] std::io::Error),
    #[error("schemathesis did not finish within {0:?}; output so far:\n{1}")]
    Timeout(Duration, String),
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/schemathesis")
}

/// The hooks file with the project's own check (`peers/schemathesis/hooks.py`).
pub fn hooks_file() -> PathBuf {
    peers_dir().join("hooks.py")
}

/// `<target dir>/tmp/schemathesis-venv`, beside the aiocoap one.
pub fn default_venv_dir() -> PathBuf {
    crate::python_venv::venv_dir("schemathesis-venv")
}

/// The `st` command: [`ST_VAR`], else the virtual environment, created and filled from
/// `testbed/peers/schemathesis/requirements.txt` on first use, once per process.
pub fn st() -> Result<PathBuf, SchemathesisError> {
    static ST: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    ST.get_or_init(|| {
        if let Some(st) = std::env::var_os(ST_VAR) {
            return Ok(PathBuf::from(st));
        }
        install(&default_venv_dir()).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|detail| SchemathesisError::Install {
        venv: default_venv_dir(),
        detail,
    })
}

fn install(venv: &Path) -> Result<PathBuf, SchemathesisError> {
    let st = venv.join("bin/st");
    let failed = |detail: String| SchemathesisError::Install {
        venv: venv.to_path_buf(),
        detail,
    };
    let ready = |st: &Path| {
        Command::new(st)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&st) {
        return Ok(st);
    }
    tracing::info!(venv = %venv.display(), "installing schemathesis into a virtual environment");
    crate::python_venv::create_and_install(venv, &peers_dir().join("requirements.txt"))
        .map_err(failed)?;
    if !ready(&st) {
        return Err(failed("st --version fails after the install".into()));
    }
    Ok(st)
}

/// What one run printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub output: String,
}

/// Runs `st --config-file <config> run <schema> --url <url> <args>` with the project's
/// hooks, killing it after `deadline`. stdout and stderr are read together. A run that the
/// tool itself crashed (see [`crashed_in_python`]; the hooks now keep the known cause from
/// crashing it) is run once more, and says so.
pub fn run(
    config: &Path,
    schema: &Path,
    url: &str,
    args: &[&str],
    deadline: Duration,
) -> Result<Outcome, SchemathesisError> {
    let first = run_once(config, schema, url, args, deadline)?;
    if first.success || !crashed_in_python(&first.output) {
        return Ok(first);
    }
    let mut again = run_once(config, schema, url, args, deadline)?;
    again.output = format!(
        "(the first run crashed inside Python and was run again; its output:)\n{}\n(the second run:)\n{}",
        first.output, again.output
    );
    Ok(again)
}

/// CPython 3.11 can fail with "AST constructor recursion depth mismatch" while hypothesis
/// describes a deeply nested strategy (it parses lambda sources); schemathesis then reports a
/// Runtime Error that says nothing about the API under test.
pub fn crashed_in_python(output: &str) -> bool {
    output.contains("SystemError: AST constructor recursion depth mismatch")
}

fn run_once(
    config: &Path,
    schema: &Path,
    url: &str,
    args: &[&str],
    deadline: Duration,
) -> Result<Outcome, SchemathesisError> {
    // Its working directory takes whatever it writes (hypothesis database, reports).
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("st.log");
    let log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
    };
    let mut child = Command::new(st()?)
        .arg("--config-file")
        .arg(config)
        .arg("run")
        .arg(schema)
        .arg("--url")
        .arg(url)
        .args(args)
        .env("SCHEMATHESIS_HOOKS", hooks_file())
        // No telemetry, no colours.
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log()?)
        .stderr(log()?)
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut output = String::new();
    std::fs::File::open(&log_path)?.read_to_string(&mut output)?;
    match status {
        Some(status) => Ok(Outcome {
            success: status.success(),
            output,
        }),
        None => Err(SchemathesisError::Timeout(deadline, output)),
    }
}
