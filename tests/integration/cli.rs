//! The command line: `print-default-config` prints a configuration that `check-config`
//! accepts, and a bad configuration exits 64 with one explaining line.

use std::process::Command;

fn bridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nidd-bridge"))
}

/// `nidd-bridge check-config --config path`, run to completion.
pub fn check_config_at(path: &std::path::Path) -> std::process::Output {
    bridge()
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn printed_default_config_passes_check_config() {
    let output = bridge().arg("print-default-config").output().unwrap();
    assert!(output.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, &output.stdout).unwrap();
    let check = check_config_at(&path);
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
        let check = check_config_at(&path);
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
    let check = check_config_at(&path);
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

/// The example configuration with `scef_keys` added to `[scef]` and `tables` before
/// `[callback]`.
fn example_with(scef_keys: &str, tables: &str) -> String {
    let example = String::from_utf8(
        bridge()
            .arg("print-default-config")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(example.contains("scs_as_id = \"bridge-1\"\n") && example.contains("\n[callback]\n"));
    example
        .replace(
            "scs_as_id = \"bridge-1\"\n",
            &format!("scs_as_id = \"bridge-1\"\n{scef_keys}\n"),
        )
        .replace("\n[callback]\n", &format!("\n{tables}\n[callback]\n"))
}

fn check_config(dir: &std::path::Path, text: &str) -> (Option<i32>, String, String) {
    let path = dir.join("t8.toml");
    std::fs::write(&path, text).unwrap();
    let output = check_config_at(&path);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_config_refuses_insecure_or_conflicting_t8_settings_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "cli-client-secret-value\n").unwrap();
    let oauth2 = format!(
        "[scef.oauth2]\ntoken_url = \"https://auth.example/token\"\nclient_id = \"bridge\"\nclient_secret_file = \"{}\"\nauth_method = \"client_secret_post\"\n",
        secret.display()
    );
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for (text, expected) in [
        (
            example_with("", "").replace("https://scef.operator.example", "http://127.0.0.1:8080"),
            "allow_insecure_http",
        ),
        (
            example_with("bearer_token_env = \"T8_TOKEN\"", &oauth2),
            "exclude each other",
        ),
        (
            example_with(&format!("ca_file = \"{}\"", missing.display()), ""),
            "scef.ca_file",
        ),
        (
            example_with(&format!("ca_file = \"{}\"", not_pem.display()), ""),
            "no PEM certificate",
        ),
        (
            example_with(&format!("client_cert_file = \"{}\"", missing.display()), ""),
            "go together",
        ),
        (
            example_with("", &oauth2.replace("client-secret", "no-such-secret")),
            "client_secret_file",
        ),
    ] {
        let (code, _, stderr) = check_config(dir.path(), &text);
        assert_eq!(code, Some(64), "{expected}: {stderr}");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    }
    // Plain http is accepted when asked for; OAuth2 with a readable secret is fine, and the
    // secret is printed nowhere.
    let (code, _, stderr) = check_config(
        dir.path(),
        &example_with("allow_insecure_http = true", "")
            .replace("https://scef.operator.example", "http://127.0.0.1:8080"),
    );
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stdout, stderr) = check_config(dir.path(), &example_with("", &oauth2));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("OAuth2 client credentials"), "{stdout}");
    // `run` refuses a configuration whose files are unusable the same way (exit 64).
    let path = dir.path().join("missing-ca.toml");
    std::fs::write(
        &path,
        example_with(&format!("ca_file = \"{}\"", missing.display()), ""),
    )
    .unwrap();
    let run = bridge()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&run.stderr).contains("scef.ca_file"));
    assert!(
        !stdout.contains("cli-client-secret-value") && !stderr.contains("cli-client-secret-value")
    );
}

/// The hardened example (`deploy/nidd-bridge.hardened.toml`) passes `check-config` once its
/// certificates, keys and secrets exist, and names the first one missing otherwise.
#[test]
fn the_hardened_example_passes_check_config_with_its_files_in_place() {
    use nidd_testbed::pki::TestCa;

    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    let secrets = dir.path().join("secrets");
    let tls = etc.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/nidd-bridge.hardened.toml"
    ))
    .unwrap()
    .replace("/etc/nidd-bridge/", &format!("{}/", etc.display()))
    .replace("/run/secrets/", &format!("{}/", secrets.display()));
    let path = dir.path().join("hardened.toml");
    std::fs::write(&path, &text).unwrap();
    let check = || check_config_at(&path);

    let refused = check();
    assert_eq!(refused.status.code(), Some(64), "nothing in place yet");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let ca = TestCa::new().unwrap();
    let ca_pem = ca.write_ca(&tls);
    std::fs::copy(&ca_pem, tls.join("scef-ca.pem")).unwrap();
    std::fs::copy(&ca_pem, tls.join("scef-client-ca.pem")).unwrap();
    let (cert, key) = ca.issue_client(&tls, "t8-client").unwrap();
    std::fs::rename(key, secrets.join("t8-client.key")).unwrap();
    assert!(cert.ends_with("t8-client.pem"));
    for listener in ["callback", "admin"] {
        let (cert, key) = ca
            .issue_server(&tls, &["nidd-bridge-1.bridge.operator.example"])
            .unwrap();
        std::fs::rename(cert, tls.join(format!("{listener}.pem"))).unwrap();
        std::fs::rename(key, secrets.join(format!("{listener}.key"))).unwrap();
    }
    std::fs::write(secrets.join("t8-oauth2-client-secret"), "client-secret\n").unwrap();
    std::fs::write(secrets.join("admin-token"), "admin-token\n").unwrap();

    let accepted = check();
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let stdout = String::from_utf8_lossy(&accepted.stdout);
    assert!(
        stdout.contains("ca_file only") && stdout.contains("OAuth2 client credentials"),
        "{stdout}"
    );

    std::fs::remove_file(secrets.join("admin-token")).unwrap();
    let refused = check();
    assert_eq!(refused.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("admin.bearer_token_file"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
