//! Sans-IO routing of one device's datagrams between LwM2M servers: which server an uplink
//! datagram goes to, remembered from the server requests that came down.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::coap::{Datagram, Kind};

/// Exchanges remembered per device; enough for several concurrent requests and observations.
const REMEMBERED_EXCHANGES: usize = 64;

/// Index of a server in the configured `lwm2m_servers` list.
pub(crate) type ServerIndex = usize;

/// An OSCORE kid (and optionally kid context) that selects a server for protected requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KidRoute {
    pub kid: Vec<u8>,
    pub kid_context: Option<Vec<u8>>,
    pub server: ServerIndex,
}

/// Per-device routing memory.
#[derive(Debug, Clone)]
pub(crate) struct Router {
    default_server: ServerIndex,
    bootstrap_server: Option<ServerIndex>,
    kid_routes: Arc<[KidRoute]>,
    /// The server requests that came down, once a server other than the default one sent
    /// one: until then every answer goes to the default server, and a device with one server
    /// (most of them) holds nothing here.
    remembered: Option<Box<Remembered>>,
}

#[derive(Debug, Clone, Default)]
struct Remembered {
    by_token: VecDeque<(Vec<u8>, ServerIndex)>,
    by_message_id: VecDeque<(u16, ServerIndex)>,
}

impl Router {
    pub(crate) fn new(
        default_server: ServerIndex,
        bootstrap_server: Option<ServerIndex>,
        kid_routes: Arc<[KidRoute]>,
    ) -> Self {
        Self {
            default_server,
            bootstrap_server,
            kid_routes,
            remembered: None,
        }
    }

    /// Sends the device's traffic that no exchange ties to a server to `server` from now on.
    /// An answer to a request the old default server sent before the change goes to the new
    /// one, unless another server had asked something meanwhile (requests are remembered only
    /// from then on).
    pub(crate) fn set_default_server(&mut self, server: ServerIndex) {
        self.default_server = server;
    }

    /// Chooses the server for a datagram the device sent.
    pub(crate) fn route_uplink(&self, datagram: &Datagram) -> ServerIndex {
        if datagram.is_request() && datagram.oscore {
            // Protected: Uri-Path is encrypted; the kid says which server's context it uses.
            let route = self.kid_routes.iter().find(|r| {
                datagram.oscore_kid.as_ref() == Some(&r.kid)
                    && r.kid_context
                        .as_ref()
                        .is_none_or(|c| datagram.oscore_kid_context.as_ref() == Some(c))
            });
            return route.map_or(self.default_server, |r| r.server);
        }
        if datagram.is_request() {
            let bootstrap =
                !datagram.oscore && datagram.uri_path.first().map(String::as_str) == Some("bs");
            return match (bootstrap, self.bootstrap_server) {
                (true, Some(server)) => server,
                _ => self.default_server,
            };
        }
        // A response or empty message answers a server request: piggybacked answers and
        // ACK/RST match the request's message ID, separate responses and notifications its token.
        let Some(remembered) = self.remembered.as_deref() else {
            return self.default_server;
        };
        let by_mid = || {
            remembered
                .by_message_id
                .iter()
                .rev()
                .find(|(mid, _)| *mid == datagram.message_id)
                .map(|(_, s)| *s)
        };
        let by_token = || {
            (!datagram.token.is_empty())
                .then(|| {
                    remembered
                        .by_token
                        .iter()
                        .rev()
                        .find(|(token, _)| *token == datagram.token)
                        .map(|(_, s)| *s)
                })
                .flatten()
        };
        let found = match datagram.kind {
            Kind::Acknowledgement | Kind::Reset => by_mid().or_else(by_token),
            Kind::Confirmable | Kind::NonConfirmable => by_token().or_else(by_mid),
        };
        found.unwrap_or(self.default_server)
    }

    /// Remembers a datagram a server sent to the device, so the answer finds its way back.
    pub(crate) fn note_downlink(&mut self, server: ServerIndex, datagram: &Datagram) {
        if self.remembered.is_none() && server == self.default_server {
            return;
        }
        let remembered = self.remembered.get_or_insert_with(Box::default);
        if matches!(datagram.kind, Kind::Confirmable | Kind::NonConfirmable) {
            remember(&mut remembered.by_message_id, datagram.message_id, server);
        }
        if datagram.is_request() && !datagram.token.is_empty() {
            remember(&mut remembered.by_token, datagram.token.clone(), server);
        }
    }
}

fn remember<K: PartialEq>(list: &mut VecDeque<(K, ServerIndex)>, key: K, server: ServerIndex) {
    list.retain(|(k, _)| *k != key);
    if list.len() == REMEMBERED_EXCHANGES {
        list.pop_front();
    }
    list.push_back((key, server));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(kind: Kind, code: u8, mid: u16, token: &[u8], path: &[&str]) -> Datagram {
        Datagram {
            kind,
            code,
            message_id: mid,
            token: token.to_vec(),
            oscore: false,
            oscore_kid: None,
            oscore_kid_context: None,
            uri_path: path.iter().map(|s| s.to_string()).collect(),
            uri_query: vec![],
        }
    }

    const DM: ServerIndex = 0;
    const BS: ServerIndex = 1;

    #[test]
    fn bootstrap_requests_go_to_the_bootstrap_server() {
        let router = Router::new(DM, Some(BS), Arc::from(vec![]));
        assert_eq!(
            router.route_uplink(&datagram(Kind::Confirmable, 2, 1, &[1], &["bs"])),
            BS
        );
        assert_eq!(
            router.route_uplink(&datagram(Kind::Confirmable, 2, 2, &[1], &["rd"])),
            DM
        );
        let mut protected = datagram(Kind::Confirmable, 2, 3, &[1], &["bs"]);
        protected.oscore = true;
        assert_eq!(router.route_uplink(&protected), DM);
        assert_eq!(
            Router::new(DM, None, Arc::from(vec![])).route_uplink(&datagram(
                Kind::Confirmable,
                2,
                1,
                &[],
                &["bs"]
            )),
            DM
        );
    }

    #[test]
    fn protected_requests_follow_their_kid() {
        let routes: Arc<[KidRoute]> = Arc::from(vec![
            KidRoute {
                kid: vec![0x01],
                kid_context: None,
                server: BS,
            },
            KidRoute {
                kid: vec![0x02],
                kid_context: Some(vec![0xaa]),
                server: 2,
            },
        ]);
        let router = Router::new(DM, Some(BS), routes);
        let mut request = datagram(Kind::Confirmable, 2, 1, &[1], &[]);
        request.oscore = true;
        request.oscore_kid = Some(vec![0x01]);
        assert_eq!(router.route_uplink(&request), BS);
        request.oscore_kid = Some(vec![0x02]);
        assert_eq!(
            router.route_uplink(&request),
            DM,
            "kid context must match too"
        );
        request.oscore_kid_context = Some(vec![0xaa]);
        assert_eq!(router.route_uplink(&request), 2);
        request.oscore_kid = Some(vec![0x09]);
        assert_eq!(
            router.route_uplink(&request),
            DM,
            "unknown kid: default server"
        );
    }

    #[test]
    fn answers_go_back_to_the_asking_server() {
        let mut router = Router::new(DM, Some(BS), Arc::from(vec![]));
        router.note_downlink(BS, &datagram(Kind::Confirmable, 3, 77, &[9, 9], &["0"]));
        // Piggybacked response: same MID.
        assert_eq!(
            router.route_uplink(&datagram(Kind::Acknowledgement, 0x44, 77, &[9, 9], &[])),
            BS
        );
        // Separate response / notification: same token, new MID.
        assert_eq!(
            router.route_uplink(&datagram(Kind::Confirmable, 0x45, 500, &[9, 9], &[])),
            BS
        );
        // Unknown exchange: default server.
        assert_eq!(
            router.route_uplink(&datagram(Kind::Acknowledgement, 0, 1, &[], &[])),
            DM
        );
    }

    #[test]
    fn a_device_talking_to_its_default_server_only_remembers_nothing() {
        let mut router = Router::new(DM, Some(BS), Arc::from(vec![]));
        for mid in 0..10u16 {
            router.note_downlink(DM, &datagram(Kind::Confirmable, 1, mid, &[1, 2], &["3"]));
        }
        assert!(router.remembered.is_none());
        assert_eq!(
            router.route_uplink(&datagram(Kind::Acknowledgement, 0x45, 9, &[1, 2], &[])),
            DM
        );
        // Once another server asks, both are told apart.
        router.note_downlink(BS, &datagram(Kind::Confirmable, 3, 20, &[7], &["0"]));
        router.note_downlink(DM, &datagram(Kind::Confirmable, 1, 21, &[8], &["3"]));
        assert_eq!(
            router.route_uplink(&datagram(Kind::Acknowledgement, 0x44, 20, &[7], &[])),
            BS
        );
        assert_eq!(
            router.route_uplink(&datagram(Kind::Acknowledgement, 0x45, 21, &[8], &[])),
            DM
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut router = Router::new(DM, Some(BS), Arc::from(vec![]));
        for mid in 0..1000u16 {
            router.note_downlink(
                BS,
                &datagram(Kind::Confirmable, 1, mid, &mid.to_be_bytes(), &[]),
            );
        }
        let remembered = router.remembered.as_deref().unwrap();
        assert_eq!(remembered.by_message_id.len(), REMEMBERED_EXCHANGES);
        assert_eq!(remembered.by_token.len(), REMEMBERED_EXCHANGES);
        assert_eq!(
            router.route_uplink(&datagram(Kind::Acknowledgement, 0, 999, &[], &[])),
            BS
        );
        assert_eq!(
            router.route_uplink(&datagram(Kind::Acknowledgement, 0, 1, &[], &[])),
            DM
        );
    }
}
