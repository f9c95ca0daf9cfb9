//! The command line: `print-default-config` prints a configuration that `check-config`
//! accepts, and a bad configuration exits 64 with one explaining line.

use std::process::Command;

fn bridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nidd-bridge"))
}

#[test]
fn printed_default_config_passes_check_config() {
    let output = bridge().arg("print-default-config").output().unwrap();
    assert!(output.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, &output.stdout).unwrap();
    let check = bridge()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok"));
}

#[test]
fn bad_config_exits_64_and_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("[scef]\nbase_url = 5\n", "base_url"),
        ("this is not toml", "expected"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let check = bridge()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(check.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
    let example = String::from_utf8(
        bridge()
            .arg("print-default-config")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, example.replace("max_body_bytes", "max_body_size")).unwrap();
    let check = bridge()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&check.stderr).contains("max_body_size"));
    let run = bridge()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(64),
        "run refuses a bad config the same way"
    );
}
