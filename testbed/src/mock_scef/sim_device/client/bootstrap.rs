//! The Bootstrap interface (LwM2M Core §5.2) while a client-initiated bootstrap runs:
//! Bootstrap-Discover, -Read (Server object), -Write, -Delete and -Finish.

use coap_lite::{RequestType, ResponseType};

use super::super::content::{self, LINK_FORMAT};
use super::super::objects::{DEVICE, Kind, Path, SECURITY, SERVER, Value, resource_def};
use super::requests::{Answer, Request};
use super::{Bootstrap, Core, Purpose};

impl Core {
    pub(super) fn dispatch_bootstrap(&mut self, request: &Request<'_>) -> Answer {
        if request.bootstrap_finish {
            return if request.method == RequestType::Post {
                self.bootstrap_finish()
            } else {
                Answer::code(ResponseType::MethodNotAllowed)
            };
        }
        let Some(path) = request.path.clone() else {
            return Answer::code(ResponseType::NotFound);
        };
        match request.method {
            RequestType::Get if request.accept == Some(LINK_FORMAT) => {
                self.bootstrap_discover(&path)
            }
            RequestType::Get if path.object() == Some(SERVER) => {
                // Bootstrap-Read (1.1): the Server object only.
                let format = match self.read_format(&path, request.accept) {
                    Ok(format) => format,
                    Err(answer) => return answer,
                };
                if !self.store.contains(&path) {
                    return Answer::code(ResponseType::NotFound);
                }
                match content::encode(&self.store, &path, format) {
                    Ok(payload) => Answer::content(format.number(), payload),
                    Err(_) => Answer::code(ResponseType::NotAcceptable),
                }
            }
            RequestType::Get => Answer::code(ResponseType::BadRequest),
            RequestType::Put => self.bootstrap_write(&path, request),
            RequestType::Delete => self.bootstrap_delete(&path),
            _ => Answer::code(ResponseType::MethodNotAllowed),
        }
    }

    /// Bootstrap-Write: creates instances as needed and writes any resource, read-only ones
    /// included.
    fn bootstrap_write(&mut self, path: &Path, request: &Request<'_>) -> Answer {
        let Some(object) = path.object() else {
            return Answer::code(ResponseType::BadRequest);
        };
        let written = match self.decode(path, request) {
            Ok(written) => written,
            Err(answer) => return answer,
        };
        for target in written {
            let instance = match target
                .instance
                .or_else(|| self.store.free_instance_id(object))
            {
                Some(i) => i,
                None => return Answer::code(ResponseType::BadRequest),
            };
            if self.store.instance(object, instance).is_none() {
                self.store.create_instance(object, instance);
            }
            for (resource, value) in target.resources {
                if resource_def(object, resource).kind == Kind::None {
                    return Answer::code(ResponseType::BadRequest);
                }
                self.store_written(object, instance, resource, value, true);
            }
        }
        Answer::code(ResponseType::Changed)
    }

    pub(super) fn is_bootstrap_account(&self, object: u16, instance: u16) -> bool {
        object == SECURITY && self.store.value(SECURITY, instance, 1) == Some(&Value::Boolean(true))
    }

    /// Bootstrap-Delete: everything but the Device object and the bootstrap server's account.
    fn bootstrap_delete(&mut self, path: &Path) -> Answer {
        let targets: Vec<(u16, u16)> = match *path.segments() {
            [] => self.store.instance_ids().collect(),
            [o] => self
                .store
                .instance_ids()
                .filter(|(io, _)| *io == o)
                .collect(),
            [o, i] => {
                if o == DEVICE || self.is_bootstrap_account(o, i) {
                    return Answer::code(ResponseType::BadRequest);
                }
                vec![(o, i)]
            }
            _ => return Answer::code(ResponseType::BadRequest),
        };
        for (object, instance) in targets {
            if object != DEVICE && !self.is_bootstrap_account(object, instance) {
                self.remove_instance(object, instance);
            }
        }
        Answer::code(ResponseType::Deleted)
    }

    /// Bootstrap-Discover (Core §5.2.7.3): the version, then every instance, with the Short
    /// Server ID of server accounts and the URI of security ones.
    fn bootstrap_discover(&self, path: &Path) -> Answer {
        if path.depth() > 1 {
            return Answer::code(ResponseType::BadRequest);
        }
        let mut links = vec!["</>;lwm2m=1.1".to_string()];
        for (o, i) in self.store.instance_ids() {
            if path.object().is_some_and(|p| p != o) {
                continue;
            }
            let mut link = format!("</{o}/{i}>");
            let integer = |r| match self.store.value(o, i, r) {
                Some(Value::Integer(v)) => Some(*v),
                _ => None,
            };
            match o {
                SECURITY if !self.is_bootstrap_account(o, i) => {
                    if let Some(ssid) = integer(10) {
                        link.push_str(&format!(";ssid={ssid}"));
                    }
                    if let Some(Value::String(uri)) = self.store.value(o, i, 0) {
                        link.push_str(&format!(";uri=\"{uri}\""));
                    }
                }
                SERVER => {
                    if let Some(ssid) = integer(0) {
                        link.push_str(&format!(";ssid={ssid}"));
                    }
                }
                _ => {}
            }
            links.push(link);
        }
        Answer::content(LINK_FORMAT, links.join(",").into_bytes())
    }

    fn bootstrap_finish(&mut self) -> Answer {
        if self.dm_server_strict().is_none() {
            // No DM server account to register with (Core §5.2.5: 4.06).
            return Answer::code(ResponseType::NotAcceptable);
        }
        let reply = match std::mem::replace(&mut self.bootstrap, Bootstrap::Idle) {
            Bootstrap::Active { reply, .. } => reply,
            // Finished before the answer to the Bootstrap-Request arrived.
            _ => self
                .outstanding
                .as_mut()
                .filter(|o| o.purpose == Purpose::Bootstrap)
                .and_then(|o| o.reply.take()),
        };
        if let Some(reply) = reply {
            let _ = reply.send(Ok("bootstrapped".into()));
        }
        // The old registration belongs to the old configuration.
        self.end_registration();
        Answer::code(ResponseType::Changed)
    }
}
