//! The Kubernetes manifests (`deploy/kubernetes`: the base, and the anyip variant in
//! `deploy/kubernetes/anyip`), checked with no cluster:
//!
//! - both render as kustomize renders them (`nidd_testbed::kubernetes::render`; where `kubectl`
//!   is installed, its kustomize must render the same), and every resource fits the strict
//!   Kubernetes schemas of the oldest and the newest version kubernetes-validate bundles;
//! - the bridge's containers are restricted (non-root, read-only root file system, all
//!   capabilities dropped, no privilege escalation, RuntimeDefault seccomp); the one container
//!   with a capability is anyip's route init container, with NET_ADMIN alone, and it runs first;
//! - that init container's script, run here with stand-ins for `ip` and `iptables`, routes
//!   exactly the prefix the bridge reads from its shard's file, for every shard;
//! - every anyip shard file is the base's but for `[sockets]`, and passes `check-config` but for
//!   its prefix, which is not local on the test host (with a loopback prefix it passes).
//!
//! Each check also runs on a broken copy of the manifests, to show that it can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nidd_bridge::config::{AddressPrefix, Config, SocketBackend};
use nidd_testbed::kubernetes::{self, KUBERNETES_VERSIONS};
use serde_json::{Value, json};

use super::cli::check_config_at;

/// The pod template's init container that routes the prefix (anyip only).
const ROUTE_INIT: &str = "anyip-routes";
/// The mount path of the shard files in every container.
const SHARDS_DIR: &str = "/etc/nidd-bridge/shards";

fn deploy(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes")
        .join(dir)
}

/// The rendered base and anyip variant, rendered once per test binary.
fn rendered() -> &'static (Vec<Value>, Vec<Value>) {
    static RENDERED: OnceLock<(Vec<Value>, Vec<Value>)> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let render = |dir: &str| {
            kubernetes::render(&deploy(dir)).unwrap_or_else(|e| panic!("rendering {dir}: {e}"))
        };
        (render(""), render("anyip"))
    })
}

/// Resources by (apiVersion, kind, name); a name twice is a failure.
fn by_identity(resources: &[Value]) -> BTreeMap<(String, String, String), Value> {
    let mut map = BTreeMap::new();
    for resource in resources {
        let key = (
            resource["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            resource["kind"].as_str().unwrap_or_default().to_owned(),
            resource["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        assert!(
            map.insert(key.clone(), resource.clone()).is_none(),
            "{key:?} twice"
        );
    }
    map
}

fn statefulset(resources: &[Value]) -> &Value {
    let mut found = resources.iter().filter(|r| r["kind"] == "StatefulSet");
    let statefulset = found.next().expect("a StatefulSet");
    assert!(found.next().is_none(), "one StatefulSet");
    statefulset
}

fn pod_spec_mut(resources: &mut [Value]) -> &mut Value {
    let statefulset = resources
        .iter_mut()
        .find(|r| r["kind"] == "StatefulSet")
        .expect("a StatefulSet");
    &mut statefulset["spec"]["template"]["spec"]
}

fn named<'a>(containers: &'a Value, name: &str) -> &'a Value {
    containers
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The pods' names: `<StatefulSet>-<ordinal>` for every replica.
fn pod_names(statefulset: &Value) -> Vec<String> {
    let name = statefulset["metadata"]["name"].as_str().unwrap();
    let replicas = statefulset["spec"]["replicas"].as_u64().unwrap();
    (0..replicas).map(|i| format!("{name}-{i}")).collect()
}

/// The files of the pod template's `config` volume, as the kubelet lays them out: every key of
/// every ConfigMap its projection names.
fn shard_files(resources: &[Value]) -> BTreeMap<String, String> {
    let spec = &statefulset(resources)["spec"]["template"]["spec"];
    let volume = named(&spec["volumes"], "config");
    let mut files = BTreeMap::new();
    for source in volume["projected"]["sources"].as_array().unwrap() {
        let name = source["configMap"]["name"].as_str().unwrap();
        let config_map = resources
            .iter()
            .find(|r| r["kind"] == "ConfigMap" && r["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the projected ConfigMap {name} is not in the manifests"));
        for (key, text) in config_map["data"].as_object().unwrap() {
            let text = text.as_str().unwrap().to_owned();
            assert!(files.insert(key.clone(), text).is_none(), "{key} twice");
        }
    }
    files
}

/// Every pod's file: `<pod name>.toml`, parsed by the bridge's own parser.
fn shard_configs(resources: &[Value]) -> Vec<(String, String, Config)> {
    let files = shard_files(resources);
    pod_names(statefulset(resources))
        .into_iter()
        .map(|pod| {
            let text = files
                .get(&format!("{pod}.toml"))
                .unwrap_or_else(|| panic!("pod {pod} has no {pod}.toml"))
                .clone();
            let config = Config::parse(&text).unwrap_or_else(|e| panic!("{pod}.toml: {e}"));
            (pod, text, config)
        })
        .collect()
}

#[test]
fn the_manifests_render_as_kustomize_does_and_fit_the_kubernetes_schemas() {
    let (base, anyip) = rendered();
    for resources in [base, anyip] {
        let kinds: BTreeSet<_> = by_identity(resources)
            .into_keys()
            .map(|(_, kind, name)| format!("{kind}/{name}"))
            .collect();
        assert_eq!(
            kinds,
            BTreeSet::from(
                [
                    "ConfigMap/nidd-bridge-0",
                    "ConfigMap/nidd-bridge-1",
                    "Service/nidd-bridge",
                    "Service/nidd-bridge-0-callback",
                    "Service/nidd-bridge-1-callback",
                    "StatefulSet/nidd-bridge",
                    "NetworkPolicy/nidd-bridge",
                ]
                .map(String::from)
            )
        );
    }
    // The renderer implements only what these kustomizations use; the real kustomize (inside
    // kubectl) must agree with it wherever it is installed.
    for (dir, ours) in [("", base), ("anyip", anyip)] {
        match kubernetes::kustomize_build(&deploy(dir)) {
            Some(theirs) => assert_eq!(
                by_identity(ours),
                by_identity(&theirs.unwrap()),
                "kubectl kustomize renders deploy/kubernetes/{dir} differently"
            ),
            None => eprintln!(
                "no kubectl on PATH: deploy/kubernetes/{dir} rendered by the test's renderer alone"
            ),
        }
    }
    let all: Vec<Value> = base.iter().chain(anyip).cloned().collect();
    let results = kubernetes::validate(&all, &KUBERNETES_VERSIONS).unwrap();
    assert_eq!(results.len(), all.len() * KUBERNETES_VERSIONS.len());
    let errors: Vec<_> = results.iter().filter(|r| r.error.is_some()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn schema_validation_refuses_a_wrong_type_an_unknown_field_a_missing_one_and_an_unknown_kind() {
    let statefulset = statefulset(&rendered().1);
    let broken = |change: &dyn Fn(&mut Value)| {
        let mut copy = statefulset.clone();
        change(&mut copy);
        copy
    };
    let cases = [
        (
            broken(&|s| s["spec"]["replicas"] = json!("2")),
            "spec.replicas: '2' is not of type 'integer'",
        ),
        (
            broken(&|s| {
                s["spec"]["template"]["spec"]["initContainers"][0]["securityContext"]["readOnlyRootFilesytem"] =
                    json!(true)
            }),
            "'readOnlyRootFilesytem' was unexpected",
        ),
        (
            broken(&|s| {
                s["spec"]["template"]["spec"]["containers"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("name");
            }),
            "'name' is a required property",
        ),
        (
            broken(&|s| s["kind"] = json!("StatefullSet")),
            "Couldn't find schema for kind StatefullSet",
        ),
    ];
    let resources: Vec<Value> = cases.iter().map(|(r, _)| r.clone()).collect();
    let results = kubernetes::validate(&resources, &["1.37.0"]).unwrap();
    assert_eq!(results.len(), cases.len());
    for ((_, expected), result) in cases.iter().zip(&results) {
        let error = result.error.as_deref().unwrap_or_default();
        assert!(error.contains(expected), "{expected}: {result:?}");
    }
}

/// What keeps the pod template of `resources`' StatefulSet from being restricted, and the init
/// containers that hold NET_ADMIN. An init container may hold NET_ADMIN, and nothing else, as
/// root, if it runs before every other init container and mounts nothing but ConfigMaps and
/// scratch space; everything else must be restricted.
fn security_review(resources: &[Value]) -> (Vec<String>, Vec<String>) {
    let spec = &statefulset(resources)["spec"]["template"]["spec"];
    let pod = &spec["securityContext"];
    let mut problems = Vec::new();
    let mut net_admin = Vec::new();
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == true {
            problems.push(format!("the pod sets {host}"));
        }
    }
    if spec["automountServiceAccountToken"] != false {
        problems.push("the pod mounts a service-account token".into());
    }
    if pod["runAsNonRoot"] != true {
        problems.push("the pod does not set runAsNonRoot".into());
    }
    if pod["seccompProfile"]["type"] != "RuntimeDefault" {
        problems.push("the pod's seccomp profile is not RuntimeDefault".into());
    }
    let volumes: BTreeMap<&str, &Value> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    for (name, volume) in &volumes {
        if volume.get("hostPath").is_some() {
            problems.push(format!("volume {name} is a hostPath"));
        }
    }
    let containers = spec["containers"].as_array().into_iter().flatten();
    let inits = spec["initContainers"].as_array().into_iter().flatten();
    for (init, container) in containers
        .map(|c| (false, c))
        .chain(inits.map(|c| (true, c)))
    {
        let name = container["name"].as_str().unwrap_or_default();
        let context = &container["securityContext"];
        let effective = |key: &str| {
            context
                .get(key)
                .filter(|v| !v.is_null())
                .unwrap_or(&pod[key])
        };
        let added = strings(&context["capabilities"]["add"]);
        let holds_net_admin = init && added == ["NET_ADMIN"];
        if holds_net_admin {
            net_admin.push(name.to_owned());
            let first_init = spec["initContainers"][0]["name"] == name;
            if !first_init {
                problems.push(format!(
                    "{name} holds NET_ADMIN but runs after other init containers"
                ));
            }
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                let volume = volumes.get(mount["name"].as_str().unwrap_or_default());
                let harmless = volume.is_some_and(|v| {
                    v.get("emptyDir").is_some()
                        || v.get("configMap").is_some()
                        || v["projected"]["sources"]
                            .as_array()
                            .is_some_and(|s| s.iter().all(|s| s.get("configMap").is_some()))
                });
                if !harmless {
                    problems.push(format!("{name} holds NET_ADMIN and mounts {mount}"));
                }
            }
        } else {
            if !added.is_empty() {
                problems.push(format!("{name} adds the capabilities {added:?}"));
            }
            if effective("runAsNonRoot") != true || effective("runAsUser") == 0 {
                problems.push(format!("{name} may run as root"));
            }
        }
        if context["privileged"] == true {
            problems.push(format!("{name} is privileged"));
        }
        if context["allowPrivilegeEscalation"] != false {
            problems.push(format!("{name} allows privilege escalation"));
        }
        if context["readOnlyRootFilesystem"] != true {
            problems.push(format!("{name} has a writable root file system"));
        }
        if !strings(&context["capabilities"]["drop"]).contains(&"ALL") {
            problems.push(format!("{name} does not drop all capabilities"));
        }
        if !matches!(
            effective("seccompProfile")["type"].as_str(),
            Some("RuntimeDefault" | "Localhost")
        ) {
            problems.push(format!("{name} runs without a seccomp profile"));
        }
    }
    (problems, net_admin)
}

#[test]
fn only_the_anyip_route_init_container_holds_a_capability_and_the_bridge_stays_restricted() {
    let (base, anyip) = rendered();
    assert_eq!(security_review(base), (vec![], vec![]));
    assert_eq!(
        security_review(anyip),
        (vec![], vec![ROUTE_INIT.to_owned()])
    );
    // The bridge's containers are the base's, with the one UDP port declared.
    let spec = |resources| &statefulset(resources)["spec"]["template"]["spec"];
    assert_eq!(
        named(&spec(anyip)["initContainers"], "check-config"),
        named(&spec(base)["initContainers"], "check-config")
    );
    let mut bridge = named(&spec(anyip)["containers"], "nidd-bridge").clone();
    let ports = bridge["ports"].as_array_mut().unwrap();
    let coap = ports.pop().unwrap();
    assert_eq!(coap["protocol"], "UDP", "{coap}");
    assert_eq!(&bridge, named(&spec(base)["containers"], "nidd-bridge"));

    // Each of these breaks the review.
    type Change = fn(&mut Value);
    let cases: [(Change, &str); 8] = [
        (
            |s| s["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["NET_ADMIN"]),
            "nidd-bridge adds the capabilities [\"NET_ADMIN\"]",
        ),
        (
            |s| s["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = json!(false),
            "nidd-bridge has a writable root file system",
        ),
        (
            |s| s["containers"][0]["securityContext"]["runAsUser"] = json!(0),
            "nidd-bridge may run as root",
        ),
        (
            |s| {
                s["securityContext"]
                    .as_object_mut()
                    .unwrap()
                    .remove("seccompProfile");
            },
            "nidd-bridge runs without a seccomp profile",
        ),
        (
            |s| {
                s["initContainers"][0]["securityContext"]["capabilities"]["add"] =
                    json!(["NET_ADMIN", "SYS_ADMIN"])
            },
            "anyip-routes adds the capabilities",
        ),
        (
            |s| s["initContainers"][0]["securityContext"]["privileged"] = json!(true),
            "anyip-routes is privileged",
        ),
        (
            |s| s["initContainers"].as_array_mut().unwrap().swap(0, 1),
            "anyip-routes holds NET_ADMIN but runs after other init containers",
        ),
        (
            |s| {
                s["initContainers"][0]["volumeMounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "t8-token", "mountPath": "/t8"}))
            },
            "anyip-routes holds NET_ADMIN and mounts",
        ),
    ];
    for (change, expected) in cases {
        let mut copy = anyip.clone();
        change(pod_spec_mut(&mut copy));
        let (problems, _) = security_review(&copy);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expected}: {problems:?}"
        );
    }
}

/// `arg` as Kubernetes expands a container's command and args: `$(NAME)` of a variable in
/// `env` becomes its value, `$$` becomes `$`, anything else stays.
fn expand(arg: &str, env: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .filter(|(name, _)| env.contains_key(name))
        {
            out.push_str(env[name]);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out + rest
}

/// Where a program is on this host's `PATH`.
fn on_path(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("no {program} on PATH"))
}

/// Runs the route init container of `resources` as pod `pod` would, with `files` as its
/// shard files, and returns the `ip` and `iptables` calls it made, one a line, or its exit
/// status and stderr. Its `PATH` holds `sed` and stand-ins for `ip`, `iptables` and
/// `ip6tables` that only write their arguments down (for `-C`, "rule present" when
/// `rules_present`), so nothing on this host changes.
fn run_route_init(
    resources: &[Value],
    pod: &str,
    files: &BTreeMap<String, String>,
    rules_present: bool,
) -> Result<Vec<String>, String> {
    let init = named(
        &statefulset(resources)["spec"]["template"]["spec"]["initContainers"],
        ROUTE_INIT,
    );
    let pod_name = init["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "POD_NAME")
        .expect("POD_NAME in the init container's environment");
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert!(
        init["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "config" && m["mountPath"] == SHARDS_DIR),
        "the init container sees the shard files at {SHARDS_DIR}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (shards, bin, log) = (
        dir.path().join("shards"),
        dir.path().join("bin"),
        dir.path().join("calls"),
    );
    std::fs::create_dir(&shards).unwrap();
    std::fs::create_dir(&bin).unwrap();
    for (name, text) in files {
        std::fs::write(shards.join(name), text).unwrap();
    }
    std::os::unix::fs::symlink(on_path("sed"), bin.join("sed")).unwrap();
    for tool in ["ip", "iptables", "ip6tables"] {
        let stand_in = bin.join(tool);
        std::fs::write(
            &stand_in,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> \"$CALLS\"\ncase \" $* \" in *\" -C \"*) [ -n \"$RULES_PRESENT\" ] ;; esac\n"
            ),
        )
        .unwrap();
        let mut permissions = std::fs::metadata(&stand_in).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(&stand_in, permissions).unwrap();
    }

    let env = BTreeMap::from([("POD_NAME", pod)]);
    let argv: Vec<String> = strings(&init["command"])
        .into_iter()
        .chain(strings(&init["args"]))
        .map(|arg| expand(arg, &env).replace(SHARDS_DIR, shards.to_str().unwrap()))
        .collect();
    assert_eq!(argv[0], "/bin/sh", "the script runs in /bin/sh");
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", &bin)
        .env("CALLS", &log)
        .env("RULES_PRESENT", if rules_present { "1" } else { "" })
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if !output.status.success() {
        return Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The calls the route init container must make for `prefix`.
fn route_calls(prefix: AddressPrefix, rules_present: bool) -> Vec<String> {
    let (family, tables) = match prefix.net() {
        ipnet::IpNet::V4(_) => ("-4", "iptables"),
        ipnet::IpNet::V6(_) => ("-6", "ip6tables"),
    };
    let mut calls = vec![format!("ip {family} route replace local {prefix} dev lo")];
    for rule in [
        format!("PREROUTING -d {prefix}"),
        format!("OUTPUT -s {prefix}"),
    ] {
        calls.push(format!("{tables} -t raw -C {rule} -j NOTRACK"));
        if !rules_present {
            calls.push(format!("{tables} -t raw -A {rule} -j NOTRACK"));
        }
    }
    calls
}

#[test]
fn the_route_init_container_routes_exactly_the_prefix_of_its_shard() {
    let anyip = &rendered().1;
    let files = shard_files(anyip);
    let mut prefixes = Vec::new();
    for (pod, _, config) in shard_configs(anyip) {
        assert_eq!(config.sockets.backend, SocketBackend::AnyIp, "{pod}");
        let prefix = config.sockets.prefix.expect("a prefix");
        for rules_present in [false, true] {
            assert_eq!(
                run_route_init(anyip, &pod, &files, rules_present),
                Ok(route_calls(prefix, rules_present)),
                "{pod}"
            );
        }
        prefixes.push(prefix.net());
    }
    // Each shard its own prefix, none inside another's.
    for (i, a) in prefixes.iter().enumerate() {
        for b in &prefixes[i + 1..] {
            assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
        }
    }

    // An IPv6 prefix takes ip -6 and ip6tables.
    let (pod, text, config) = &shard_configs(anyip)[0];
    let old = format!("prefix = \"{}\"", config.sockets.prefix.unwrap());
    assert!(text.contains(&old));
    let with = |line: &str| {
        let text = text.replace(&old, line);
        let mut files = files.clone();
        files.insert(format!("{pod}.toml"), text.clone());
        (files, Config::parse(&text))
    };
    let (v6_files, v6) = with("prefix = \"fd00:64::/64\"");
    assert_eq!(
        run_route_init(anyip, pod, &v6_files, false),
        Ok(route_calls(v6.unwrap().sockets.prefix.unwrap(), false))
    );
    // A prefix the bridge reads but the script does not (single quotes) fails the pod early,
    // as would a file without one, rather than routing something else.
    let (quoted_files, quoted) = with("prefix = '10.64.0.0/16'");
    assert!(quoted.is_ok(), "the bridge reads a single-quoted prefix");
    let refused = run_route_init(anyip, pod, &quoted_files, false).unwrap_err();
    assert!(refused.contains("no sockets.prefix"), "{refused}");
    let mut missing = files.clone();
    missing.remove(&format!("{pod}.toml"));
    assert!(run_route_init(anyip, pod, &missing, false).is_err());
}

#[test]
fn every_anyip_shard_file_passes_check_config_but_for_its_prefix_not_being_local_here() {
    let (base, anyip) = rendered();
    let base_files = shard_files(base);
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    for (subdir, file) in [
        ("nidd-bridge", "t8-token"),
        ("nidd-bridge-admin", "admin-token"),
    ] {
        std::fs::create_dir_all(secrets.join(subdir)).unwrap();
        std::fs::write(secrets.join(subdir).join(file), "token\n").unwrap();
    }
    let check = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            text.replace(
                "/var/run/secrets/",
                &format!("{}/", secrets.to_str().unwrap()),
            ),
        )
        .unwrap();
        let output = check_config_at(&path);
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let configs = shard_configs(anyip);
    assert_eq!(configs.len(), base_files.len());
    let mut ports = BTreeSet::new();
    let mut prefixes = BTreeSet::new();
    for (pod, text, config) in &configs {
        let file = format!("{pod}.toml");
        let prefix = config.sockets.prefix.expect("a prefix");
        // The same file as the base's but for [sockets].
        let without_sockets = |text: &str| {
            let mut table: toml::Table = toml::from_str(text).unwrap();
            table.remove("sockets");
            table
        };
        assert_eq!(
            without_sockets(text),
            without_sockets(&base_files[&file]),
            "{file} differs from the base's beyond [sockets]"
        );
        // All that check-config may say is that the prefix is not local on this host (unless
        // it happens to be).
        let (code, _, stderr) = check(&file, text);
        if code != Some(0) {
            assert_eq!(code, Some(64), "{file}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{file}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "sockets.prefix {prefix} is not local on this host"
                )) && stderr.contains(&format!("`ip route add local {prefix} dev lo`")),
                "{file}: {stderr}"
            );
        }
        // With a loopback prefix, local everywhere, the file passes.
        let old = format!("prefix = \"{prefix}\"");
        assert!(text.contains(&old), "{file}");
        let (code, stdout, stderr) =
            check(&file, &text.replace(&old, "prefix = \"127.64.0.0/16\""));
        assert_eq!(code, Some(0), "{file}: {stderr}");
        assert!(stdout.contains("ok"), "{stdout}");
        ports.insert(config.sockets.anyip_port);
        prefixes.insert(prefix.to_string());
    }

    // The NetworkPolicy admits UDP at the one anyip port, and the bridge declares it.
    assert_eq!(ports.len(), 1, "one anyip_port for all shards: {ports:?}");
    let port = *ports.first().unwrap();
    let policy = anyip.iter().find(|r| r["kind"] == "NetworkPolicy").unwrap();
    let udp: Vec<&Value> = policy["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_array().unwrap())
        .filter(|p| p["protocol"] == "UDP")
        .collect();
    assert_eq!(udp, [&json!({"port": port, "protocol": "UDP"})]);
    let spec = &statefulset(anyip)["spec"]["template"];
    let bridge = named(&spec["spec"]["containers"], "nidd-bridge");
    assert!(
        bridge["ports"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "coap", "containerPort": port, "protocol": "UDP"})),
        "{}",
        bridge["ports"]
    );
    // Calico lets the pods send from every shard's prefix, and from nothing else.
    let allowed: BTreeSet<String> = serde_json::from_str(
        spec["metadata"]["annotations"]["cni.projectcalico.org/allowedSourcePrefixes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(allowed, prefixes);
}
