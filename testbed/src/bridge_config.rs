//! Bridge configurations for tests and the demo: everything on loopback with free ports.

use std::net::SocketAddr;
use std::path::Path;

/// A configuration with every listener on loopback port 0 (bound addresses are read back),
/// device sockets from 127.0.0.1, fast provisioning retries, and the given `[[devices]]`
/// bodies. Used by the demo and the integration tests.
pub fn loopback_config(
    api_root: &str,
    server: SocketAddr,
    store: &Path,
    devices: &[&str],
    extra: &str,
) -> String {
    let devices: String = devices
        .iter()
        .map(|d| format!("[[devices]]\n{d}\n"))
        .collect();
    format!(
        r#"
[scef]
base_url = "{api_root}"
scs_as_id = "nidd-bridge-demo"
request_timeout_ms = 1000
retry_initial_ms = 50
retry_max_ms = 200
[callback]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[lwm2m_servers]]
name = "dm"
address = "{server}"
role = "dm"
[sockets]
bind = "127.0.0.1"
ports = "20000-39999"
[store]
path = "{}"
{extra}
{devices}
"#,
        store.display()
    )
}
