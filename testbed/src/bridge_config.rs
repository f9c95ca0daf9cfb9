//! Typed bridge configurations for tests, benchmarks and the demo: a builder over
//! `nidd_bridge::Config` with every listener on loopback port 0, and its TOML text for a bridge
//! run as its own process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};

use nidd_bridge::DeviceId;
use nidd_bridge::config::{
    AdminConfig, CallbackConfig, Config, ConfigError, DEFAULT_ANYIP_PORT, DeviceConfig,
    GroupConfig, HexBytes, ListenerLimits, Lwm2mServerConfig, NiddDefaults, OnboardingConfig,
    OneOrMany, PortRange, PsmConfig, ScefConfig, ServerRole, SocketBackend, SocketsConfig,
    StoreConfig, TokenRateLimit,
};
use url::Url;

/// The SCS/AS identifier loopback configurations use.
pub const LOOPBACK_SCS_AS_ID: &str = "nidd-bridge-demo";

/// Ports per [`device_port_block`]: more than any test bed has devices.
const DEVICE_PORT_BLOCK: u16 = 128;
/// Device port blocks come from below Linux's ephemeral range (32768–60999), so no socket bound
/// to port 0 anywhere on the machine can take a port a killed bridge is about to bind again.
const DEVICE_PORT_BLOCKS_FIRST: u16 = 20_000;
const DEVICE_PORT_BLOCKS: u16 = (32_768 - DEVICE_PORT_BLOCKS_FIRST) / DEVICE_PORT_BLOCK;

/// The prefix of the `anyip` backend in tests: local on every Linux host (all of 127.0.0.0/8
/// is), so it needs no route and no privilege.
pub const ANYIP_TEST_PREFIX: &str = "127.64.0.0/10";

/// A device port range no other test bed of this process is handed while this one plausibly
/// runs (the blocks wrap around after about a hundred), starting at a block picked from the
/// process id so two test runs on one machine rarely begin on the same one.
///
/// Why: a bridge that is killed and started again binds its devices' persisted ports again. With
/// one shared range, a bridge of a test running beside it could take a freed port in between,
/// and the restarted device would move to a new port its test never sends to.
pub fn device_port_block() -> PortRange {
    device_port_blocks(1)
}

/// `count` consecutive [`device_port_block`]s as one range (at least one, at most all), for a
/// test bed with more devices than one block holds; never wrapping past the end of the blocks.
pub fn device_port_blocks(count: u16) -> PortRange {
    static NEXT: AtomicU16 = AtomicU16::new(u16::MAX);
    let count = count.clamp(1, DEVICE_PORT_BLOCKS);
    let start = (std::process::id() % u32::from(DEVICE_PORT_BLOCKS)) as u16;
    let _ = NEXT.compare_exchange(u16::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    let previous = NEXT
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |next| {
            Some(first_block(next, count) + count)
        })
        .unwrap_or_else(|previous| previous);
    let block = first_block(previous, count);
    let first = DEVICE_PORT_BLOCKS_FIRST + block * DEVICE_PORT_BLOCK;
    PortRange {
        first,
        last: first + count * DEVICE_PORT_BLOCK - 1,
    }
}

/// The first of `count` blocks handed out when the next free one is `next`: a range that would
/// run past the last block (into the ephemeral ports) starts over at the first one instead.
fn first_block(next: u16, count: u16) -> u16 {
    let block = next % DEVICE_PORT_BLOCKS;
    if block + count <= DEVICE_PORT_BLOCKS {
        block
    } else {
        0
    }
}

/// Builds a bridge [`Config`] with typed setters.
///
/// [`BridgeConfigBuilder::loopback`] starts from a configuration with every listener on
/// 127.0.0.1 port 0 (the bound addresses are read back), device sockets from 127.0.0.1, fast
/// provisioning retries and no LwM2M server or device yet. [`build`](Self::build) goes through
/// the TOML text and [`Config::parse`], so a built configuration is validated exactly as the
/// bridge validates a file, and [`to_toml`](Self::to_toml) is what a bridge process reads.
#[derive(Debug, Clone)]
pub struct BridgeConfigBuilder {
    config: Config,
}

impl BridgeConfigBuilder {
    /// Everything on loopback, talking to the SCEF at `api_root`, with its store in `store`.
    pub fn loopback(api_root: &Url, store: &Path) -> Self {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let any_port = SocketAddr::new(loopback, 0);
        Self {
            config: Config {
                scef: ScefConfig {
                    base_url: api_root.clone(),
                    scs_as_id: LOOPBACK_SCS_AS_ID.into(),
                    bearer_token_file: None,
                    bearer_token_env: None,
                    mtc_provider_id: None,
                    request_timeout_ms: 1000,
                    retry_initial_ms: 50,
                    retry_max_ms: 200,
                    provisioning_concurrency: 16,
                    // A mock SCEF on loopback may be plain http; an https one is trusted
                    // through `ca_file` (see `scef`).
                    allow_insecure_http: api_root.scheme() == "http",
                    ca_file: None,
                    use_system_roots: None,
                    client_cert_file: None,
                    client_key_file: None,
                    oauth2: None,
                },
                callback: CallbackConfig {
                    listen: any_port,
                    public_url: None,
                    max_body_bytes: 16 * 1024,
                    tls_cert_file: None,
                    tls_key_file: None,
                    client_ca_file: None,
                    limits: ListenerLimits::default(),
                    rate_limit: TokenRateLimit::default(),
                },
                admin: AdminConfig::on(any_port),
                lwm2m_servers: Vec::new(),
                sockets: SocketsConfig {
                    bind: OneOrMany::One(loopback),
                    ports: OneOrMany::One(PortRange {
                        first: 20000,
                        last: 39999,
                    }),
                    release_grace_s: 300,
                    backend: SocketBackend::PerSocket,
                    prefix: None,
                    anyip_port: DEFAULT_ANYIP_PORT,
                },
                store: StoreConfig {
                    path: store.to_path_buf(),
                },
                nidd: NiddDefaults::default(),
                psm: PsmConfig::default(),
                devices: Vec::new(),
                onboarding: OnboardingConfig::default(),
                groups: Vec::new(),
            },
        }
    }

    /// Adds an LwM2M server without OSCORE kids.
    pub fn server(self, name: &str, address: SocketAddr, role: ServerRole) -> Self {
        self.server_with_kids(name, address, role, &[])
    }

    /// Adds an LwM2M server that protected requests carrying one of `oscore_kids` go to.
    pub fn server_with_kids(
        mut self,
        name: &str,
        address: SocketAddr,
        role: ServerRole,
        oscore_kids: &[&[u8]],
    ) -> Self {
        self.config.lwm2m_servers.push(Lwm2mServerConfig {
            oscore_kids: oscore_kids.iter().map(|k| HexBytes(k.to_vec())).collect(),
            ..Lwm2mServerConfig::new(name, address, role)
        });
        self
    }

    /// Adds a device with the `[psm]` defaults and the default server.
    pub fn device(self, id: &DeviceId) -> Self {
        self.device_with(id, |_| {})
    }

    /// Adds a device and sets its per-device options (endpoint name, server, PSM overrides).
    pub fn device_with(mut self, id: &DeviceId, options: impl FnOnce(&mut DeviceConfig)) -> Self {
        let mut device = device_entry(id);
        options(&mut device);
        self.config.devices.push(device);
        self
    }

    /// The device sockets' port range (on loopback).
    pub fn device_ports(mut self, range: PortRange) -> Self {
        self.config.sockets.ports = OneOrMany::One(range);
        self
    }

    /// The `anyip` backend: every device an address of 127.64.0.0/10 (local on any host, no
    /// privilege), all at one UDP port that no other bridge on this machine uses (a free one,
    /// kept across restarts of this configuration).
    ///
    /// # Panics
    ///
    /// When no free UDP port can be found.
    pub fn anyip(mut self) -> Self {
        let port = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| socket.local_addr())
            .map(|address| address.port())
            .unwrap_or_else(|error| panic!("no free UDP port for the anyip sockets: {error}"));
        let sockets = &mut self.config.sockets;
        sockets.backend = SocketBackend::AnyIp;
        sockets.prefix = Some(ANYIP_TEST_PREFIX.parse().unwrap_or_else(|e| panic!("{e}")));
        sockets.anyip_port = port;
        self
    }

    /// Sets the PSM-aware MT defaults (`[psm]`).
    pub fn psm(mut self, options: impl FnOnce(&mut PsmConfig)) -> Self {
        options(&mut self.config.psm);
        self
    }

    /// Changes the LwM2M server named `name` (its waits, say); nothing when there is none.
    pub fn server_settings(
        mut self,
        name: &str,
        options: impl FnOnce(&mut Lwm2mServerConfig),
    ) -> Self {
        if let Some(server) = self
            .config
            .lwm2m_servers
            .iter_mut()
            .find(|s| s.name == name)
        {
            options(server);
        }
        self
    }

    /// Adds a group (`[[groups]]`) whose members get the default settings.
    pub fn group(mut self, external_group_id: &str) -> Self {
        self.config.groups.push(GroupConfig {
            external_group_id: external_group_id.into(),
            lwm2m_server: None,
            buffer_owner: None,
            active_window_s: None,
            monitoring: None,
            trigger_after_s: None,
            wake_period_s: None,
        });
        self
    }

    /// Sets on-demand onboarding (`[onboarding]`).
    pub fn onboarding(mut self, options: impl FnOnce(&mut OnboardingConfig)) -> Self {
        options(&mut self.config.onboarding);
        self
    }

    /// Sets the NIDD defaults (`[nidd]`).
    pub fn nidd(mut self, options: impl FnOnce(&mut NiddDefaults)) -> Self {
        options(&mut self.config.nidd);
        self
    }

    /// Sets the T8 client's options (`[scef]`).
    pub fn scef(mut self, options: impl FnOnce(&mut ScefConfig)) -> Self {
        options(&mut self.config.scef);
        self
    }

    /// Sets the admin listener's options (`[admin]`: bearer token file, public metrics,
    /// allowed hosts, TLS, limits). The default has no token and listens on loopback.
    pub fn admin(mut self, options: impl FnOnce(&mut AdminConfig)) -> Self {
        options(&mut self.config.admin);
        self
    }

    /// Sets the callback listener's options (`[callback]`).
    pub fn callback(mut self, options: impl FnOnce(&mut CallbackConfig)) -> Self {
        options(&mut self.config.callback);
        self
    }

    /// Moves the sled store.
    pub fn store(mut self, path: &Path) -> Self {
        self.config.store.path = path.to_path_buf();
        self
    }

    /// The configuration as the TOML file a bridge process reads (same keys as the example).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(&self.config).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// The validated configuration (through its TOML text and [`Config::parse`]).
    pub fn build(&self) -> Result<Config, ConfigError> {
        Config::parse(&self.to_toml()?)
    }
}

/// The `[[devices]]` entry naming `id` by its own kind of identity.
fn device_entry(id: &DeviceId) -> DeviceConfig {
    let (external_id, msisdn) = match id {
        DeviceId::External(external) => (Some(external.to_string()), None),
        DeviceId::Msisdn(msisdn) => (None, Some(msisdn.to_string())),
    };
    DeviceConfig {
        external_id,
        msisdn,
        endpoint_name: None,
        lwm2m_server: None,
        buffer_owner: None,
        active_window_s: None,
        monitoring: None,
        trigger_after_s: None,
        wake_period_s: None,
        group: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nidd_bridge::config::{BufferOwner, EXAMPLE_CONFIG};

    fn id(text: &str) -> DeviceId {
        text.parse().unwrap()
    }

    fn everything() -> BridgeConfigBuilder {
        let api_root: Url = "http://127.0.0.1:8080/".parse().unwrap();
        BridgeConfigBuilder::loopback(&api_root, Path::new("/tmp/store"))
            .server("dm", "127.0.0.1:5683".parse().unwrap(), ServerRole::Dm)
            .server_with_kids(
                "bs",
                "127.0.0.1:5684".parse().unwrap(),
                ServerRole::Bootstrap,
                &[&[0x01], &[0x0a, 0x1b]],
            )
            .device(&id("a@iot.example"))
            .device_with(&id("491701234567"), |d| {
                d.endpoint_name = Some("urn:imei:490154203237518".into());
                d.lwm2m_server = Some("dm".into());
                d.buffer_owner = Some(BufferOwner::Scef);
                d.active_window_s = Some(4);
                d.trigger_after_s = Some(0);
            })
            .psm(|p| {
                p.active_window_s = 2;
                p.trigger_payload_base64 = "AQI=".into();
            })
            .nidd(|n| n.request_test_notification = true)
            .scef(|s| s.mtc_provider_id = Some("mtc-1".into()))
            .store(Path::new("/tmp/other-store"))
    }

    #[test]
    fn device_port_blocks_are_disjoint_below_the_ephemeral_range() {
        let blocks: Vec<PortRange> = (0..DEVICE_PORT_BLOCKS)
            .map(|_| device_port_block())
            .collect();
        for (n, block) in blocks.iter().enumerate() {
            assert!(
                block.first >= DEVICE_PORT_BLOCKS_FIRST && block.last < 32_768,
                "{block:?}"
            );
            assert_eq!(block.last - block.first + 1, DEVICE_PORT_BLOCK);
            for other in &blocks[n + 1..] {
                assert!(
                    block.last < other.first || other.last < block.first,
                    "{block:?} {other:?}"
                );
            }
        }
    }

    #[test]
    fn several_device_port_blocks_stay_below_the_ephemeral_range() {
        // The pure placement, so the shared counter of the test above is left alone.
        for count in 1..=DEVICE_PORT_BLOCKS {
            for next in 0..=DEVICE_PORT_BLOCKS {
                let first = first_block(next, count);
                assert!(first + count <= DEVICE_PORT_BLOCKS, "{next} {count}");
                let last_port = DEVICE_PORT_BLOCKS_FIRST + (first + count) * DEVICE_PORT_BLOCK - 1;
                assert!(last_port < 32_768, "{next} {count}");
            }
        }
        // Consecutive requests do not overlap while they fit.
        assert_eq!(first_block(first_block(10, 3) + 3, 3), 13);
        assert_eq!(first_block(97, 3), 0);
    }

    #[test]
    fn builder_toml_round_trips_through_config_parse() {
        let builder = everything();
        let text = builder.to_toml().unwrap();
        let config = Config::parse(&text).unwrap();
        // Parsed back, serialized again: the same text, so no key was lost or renamed.
        assert_eq!(toml::to_string(&config).unwrap(), text);
        assert_eq!(config.scef.scs_as_id, LOOPBACK_SCS_AS_ID);
        assert_eq!(config.scef.retry_initial_ms, 50);
        assert_eq!(config.scef.mtc_provider_id.as_deref(), Some("mtc-1"));
        assert_eq!(config.lwm2m_servers.len(), 2);
        assert_eq!(
            config.lwm2m_servers[1].oscore_kids,
            [HexBytes(vec![0x01]), HexBytes(vec![0x0a, 0x1b])]
        );
        assert!(text.contains("oscore_kids = [\"01\", \"0a1b\"]"), "{text}");
        assert!(text.contains("ports = \"20000-39999\""), "{text}");
        assert!(text.contains("[[devices]]"), "{text}");
        assert_eq!(config.devices.len(), 2);
        assert_eq!(config.devices[0].device_id().unwrap(), id("a@iot.example"));
        assert_eq!(config.devices[1].msisdn.as_deref(), Some("491701234567"));
        assert_eq!(config.devices[1].buffer_owner, Some(BufferOwner::Scef));
        assert_eq!(config.devices[1].trigger_after_s, Some(0));
        assert_eq!(config.psm.active_window_s, 2);
        assert!(config.nidd.request_test_notification);
        assert_eq!(config.store.path, Path::new("/tmp/other-store"));
        assert_eq!(builder.build().unwrap().devices.len(), 2);
    }

    #[test]
    fn the_example_config_serializes_to_the_same_keys() {
        // Every key the shipped example sets survives a serialize → parse round trip.
        let example = Config::parse(EXAMPLE_CONFIG).unwrap();
        let text = toml::to_string(&example).unwrap();
        let again = Config::parse(&text).unwrap();
        assert_eq!(toml::to_string(&again).unwrap(), text);
        let keys = |text: &str| -> Vec<String> {
            let value: toml::Table = text.parse().unwrap();
            let mut keys = Vec::new();
            collect_keys("", &toml::Value::Table(value), &mut keys);
            keys
        };
        let written = keys(&text);
        for key in keys(EXAMPLE_CONFIG) {
            assert!(written.contains(&key), "{key} lost in\n{text}");
        }
    }

    fn collect_keys(prefix: &str, value: &toml::Value, keys: &mut Vec<String>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let path = format!("{prefix}{key}");
                    keys.push(path.clone());
                    collect_keys(&format!("{path}."), value, keys);
                }
            }
            toml::Value::Array(items) => {
                for item in items.iter().filter(|i| i.is_table()) {
                    collect_keys(prefix, item, keys);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn only_a_plain_http_mock_is_allowed_insecure_http() {
        let store = Path::new("/tmp/store");
        let http: Url = "http://127.0.0.1:8080/".parse().unwrap();
        let https: Url = "https://127.0.0.1:8443/".parse().unwrap();
        let dm = "127.0.0.1:5683".parse().unwrap();
        let plain = BridgeConfigBuilder::loopback(&http, store).server("dm", dm, ServerRole::Dm);
        assert!(plain.build().unwrap().scef.allow_insecure_http);
        let tls = BridgeConfigBuilder::loopback(&https, store).server("dm", dm, ServerRole::Dm);
        assert!(!tls.build().unwrap().scef.allow_insecure_http);
        let refused = plain
            .scef(|s| s.allow_insecure_http = false)
            .build()
            .unwrap_err();
        assert!(
            refused.to_string().contains("allow_insecure_http"),
            "{refused}"
        );
    }

    #[test]
    fn a_configuration_without_a_dm_server_is_refused() {
        let api_root: Url = "http://127.0.0.1:8080/".parse().unwrap();
        let error = BridgeConfigBuilder::loopback(&api_root, Path::new("/tmp/store"))
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("dm"), "{error}");
    }
}
