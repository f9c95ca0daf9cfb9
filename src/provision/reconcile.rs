//! Which of the NIDD configurations the SCEF lists for our scsAsId are this bridge's, and what to
//! do with each: the sans-IO judgement behind start-up reconciliation (and the look-up after a
//! creation whose outcome is unknown). A configuration is recognised by its
//! `notificationDestination`: every device's callback URL ends in its own unguessable capability
//! token (`{public_url}/t8/v1/nidd/{token}`), which is durable before any configuration is asked
//! for, so whatever the SCEF created for us carries a token a restarted bridge knows.

use std::collections::HashSet;

use url::Url;

use crate::identity::DeviceId;

/// The path of a NIDD callback below `public_url`, before the token (see
/// `Device::callback_url`).
const NIDD_CALLBACK_PATH: &str = "/t8/v1/nidd/";

/// One listed configuration, as the judgement needs it.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    /// Its `self` link (from the SCEF's answer); `None` when it has none we may use.
    pub(crate) location: Option<Url>,
    /// The one UE it names (`externalId` or `msisdn`); `None` for none, both, or a group.
    pub(crate) ue: Option<DeviceId>,
    pub(crate) notification_destination: String,
    /// Its `status` says the SCEF ended it.
    pub(crate) terminated: bool,
}

/// A device of ours whose callback URLs carry a given token.
#[derive(Debug, Clone)]
pub(crate) struct Owner {
    pub(crate) id: DeviceId,
    /// The device holds a configuration already (persisted and checked).
    pub(crate) has_configuration: bool,
}

/// Why a configuration of ours is of no use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrayReason {
    /// Under our callback URL, but no device of ours has its token (a departed device, or a
    /// token lost with the store).
    UnknownCallback,
    /// Carries a device's token but names another UE.
    OtherUe,
    /// Carries a device's token, and that device has (or just adopted) another one.
    Duplicate,
    /// Carries a device's token, but the SCEF reports it terminated.
    Terminated,
}

impl StrayReason {
    /// For logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCallback => "unknown callback token",
            Self::OtherUe => "names another UE than the token's device",
            Self::Duplicate => "the device has another configuration",
            Self::Terminated => "terminated",
        }
    }
}

/// What to do with one listed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A device's stored configuration: nothing to do.
    Referenced,
    /// Ours, for this device, which has none: adopt it.
    Adopt(DeviceId),
    /// Ours but of no use: delete it. `device` is the one whose token it carries, if any.
    Stray {
        reason: StrayReason,
        device: Option<DeviceId>,
    },
    /// Another instance's or application's (same scsAsId, other callback): left alone.
    Foreign,
    /// No usable `self` link: it can be neither adopted nor deleted.
    Unaddressable,
}

/// The capability token of a NIDD callback URL (`{any base}/t8/v1/nidd/{token}`).
pub(crate) fn callback_token(destination: &Url) -> Option<&str> {
    let (_, token) = destination.path().rsplit_once(NIDD_CALLBACK_PATH)?;
    (!token.is_empty() && !token.contains('/') && destination.query().is_none()).then_some(token)
}

/// Whether `destination` is a NIDD callback URL of this instance (`{public_url}/t8/v1/nidd/...`).
pub(crate) fn under_public_url(destination: &Url, public_url: &Url) -> bool {
    let prefix = format!(
        "{}{NIDD_CALLBACK_PATH}",
        public_url.path().trim_end_matches('/')
    );
    destination.origin() == public_url.origin() && destination.path().starts_with(&prefix)
}

/// Judges every listed configuration in order. `referenced` holds the locations devices store;
/// `owner` finds the device a token belongs to. The first usable configuration carrying a
/// device's token and naming its UE is adopted for a device without one; later ones for the same
/// device are duplicates.
pub(crate) fn plan(
    listed: &[Listed],
    referenced: &HashSet<Url>,
    public_url: &Url,
    owner: impl Fn(&str) -> Option<Owner>,
) -> Vec<Verdict> {
    let mut adopted: HashSet<DeviceId> = HashSet::new();
    listed
        .iter()
        .map(|entry| {
            let verdict = judge(entry, referenced, public_url, &owner, &adopted);
            if let Verdict::Adopt(id) = &verdict {
                adopted.insert(id.clone());
            }
            verdict
        })
        .collect()
}

fn judge(
    entry: &Listed,
    referenced: &HashSet<Url>,
    public_url: &Url,
    owner: &impl Fn(&str) -> Option<Owner>,
    adopted: &HashSet<DeviceId>,
) -> Verdict {
    let Some(location) = &entry.location else {
        return Verdict::Unaddressable;
    };
    if referenced.contains(location) {
        return Verdict::Referenced;
    }
    let Ok(destination) = Url::parse(&entry.notification_destination) else {
        return Verdict::Foreign;
    };
    let ours = under_public_url(&destination, public_url);
    let found = callback_token(&destination).and_then(owner);
    let stray = |reason, device: Option<&DeviceId>| Verdict::Stray {
        reason,
        device: device.cloned(),
    };
    match found {
        // Our token: only this bridge can have asked for it, whatever base URL it was under.
        Some(owner) if entry.ue.as_ref() == Some(&owner.id) => {
            if entry.terminated {
                stray(StrayReason::Terminated, Some(&owner.id))
            } else if owner.has_configuration || adopted.contains(&owner.id) {
                stray(StrayReason::Duplicate, Some(&owner.id))
            } else {
                Verdict::Adopt(owner.id)
            }
        }
        Some(owner) if ours => stray(StrayReason::OtherUe, Some(&owner.id)),
        None if ours => stray(StrayReason::UnknownCallback, None),
        _ => Verdict::Foreign,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_A: &str = "0123456789abcdef0123456789abcdef";
    const TOKEN_B: &str = "fedcba9876543210fedcba9876543210";

    fn public_url() -> Url {
        Url::parse("https://bridge-0.example:8443/nidd").unwrap()
    }

    fn a() -> DeviceId {
        "a@iot.example".parse().unwrap()
    }

    fn b() -> DeviceId {
        "491700000001".parse().unwrap()
    }

    fn listed(n: u32, ue: Option<DeviceId>, destination: &str) -> Listed {
        Listed {
            location: Some(
                Url::parse(&format!("http://scef/3gpp-nidd/v1/as/configurations/{n}")).unwrap(),
            ),
            ue,
            notification_destination: destination.into(),
            terminated: false,
        }
    }

    fn ours(token: &str) -> String {
        format!("https://bridge-0.example:8443/nidd/t8/v1/nidd/{token}")
    }

    /// Device a (token A) has no configuration; device b (token B) has one.
    fn run(entries: &[Listed], referenced: &[u32]) -> Vec<Verdict> {
        let (id_a, id_b) = (a(), b());
        let referenced = referenced
            .iter()
            .map(|n| {
                Url::parse(&format!("http://scef/3gpp-nidd/v1/as/configurations/{n}")).unwrap()
            })
            .collect();
        plan(entries, &referenced, &public_url(), |token| match token {
            TOKEN_A => Some(Owner {
                id: id_a.clone(),
                has_configuration: false,
            }),
            TOKEN_B => Some(Owner {
                id: id_b.clone(),
                has_configuration: true,
            }),
            _ => None,
        })
    }

    #[test]
    fn tokens_are_read_from_nidd_callback_urls_only() {
        let url = |s: &str| Url::parse(s).unwrap();
        assert_eq!(callback_token(&url(&ours(TOKEN_A))), Some(TOKEN_A));
        assert_eq!(
            callback_token(&url("http://127.0.0.1:9/t8/v1/nidd/abc")),
            Some("abc")
        );
        assert_eq!(callback_token(&url("http://x/t8/v1/monitoring/abc")), None);
        assert_eq!(callback_token(&url("http://x/t8/v1/nidd/")), None);
        assert_eq!(callback_token(&url("http://x/t8/v1/nidd/a/b")), None);
        assert_eq!(callback_token(&url("http://x/t8/v1/nidd/abc?x=1")), None);
        assert_eq!(callback_token(&url("http://x/other/callback")), None);
    }

    #[test]
    fn only_our_nidd_callback_path_is_under_the_public_url() {
        let url = |s: &str| Url::parse(s).unwrap();
        let public = public_url();
        assert!(under_public_url(&url(&ours("x")), &public));
        assert!(!under_public_url(
            &url("https://bridge-0.example:8443/nidd/other/x"),
            &public
        ));
        assert!(!under_public_url(
            &url("https://bridge-1.example:8443/nidd/t8/v1/nidd/x"),
            &public
        ));
        assert!(!under_public_url(
            &url("http://bridge-0.example:8443/nidd/t8/v1/nidd/x"),
            &public
        ));
        let root = url("http://127.0.0.1:8081/");
        assert!(under_public_url(
            &url("http://127.0.0.1:8081/t8/v1/nidd/x"),
            &root
        ));
        assert!(!under_public_url(
            &url("http://127.0.0.1:8082/t8/v1/nidd/x"),
            &root
        ));
    }

    #[test]
    fn an_orphan_carrying_a_devices_token_and_ue_is_adopted() {
        let verdicts = run(&[listed(1, Some(a()), &ours(TOKEN_A))], &[]);
        assert_eq!(verdicts, vec![Verdict::Adopt(a())]);
    }

    #[test]
    fn our_token_is_adopted_under_an_earlier_public_url_too() {
        // The callback URL changed since (e.g. a new listener port): the token is still ours.
        let old = format!("http://10.0.0.7:8081/t8/v1/nidd/{TOKEN_A}");
        assert_eq!(
            run(&[listed(1, Some(a()), &old)], &[]),
            vec![Verdict::Adopt(a())]
        );
    }

    #[test]
    fn stored_configurations_are_left_as_they_are() {
        assert_eq!(
            run(&[listed(7, Some(b()), &ours(TOKEN_B))], &[7]),
            vec![Verdict::Referenced]
        );
    }

    #[test]
    fn a_second_configuration_of_a_device_is_a_duplicate() {
        let verdicts = run(
            &[
                listed(1, Some(a()), &ours(TOKEN_A)),
                listed(2, Some(a()), &ours(TOKEN_A)),
                listed(3, Some(b()), &ours(TOKEN_B)),
            ],
            &[],
        );
        let duplicate = |id: DeviceId| Verdict::Stray {
            reason: StrayReason::Duplicate,
            device: Some(id),
        };
        assert_eq!(
            verdicts,
            vec![Verdict::Adopt(a()), duplicate(a()), duplicate(b())]
        );
    }

    #[test]
    fn a_terminated_orphan_is_deleted_and_a_later_one_adopted() {
        let mut dead = listed(1, Some(a()), &ours(TOKEN_A));
        dead.terminated = true;
        let verdicts = run(&[dead, listed(2, Some(a()), &ours(TOKEN_A))], &[]);
        assert_eq!(
            verdicts,
            vec![
                Verdict::Stray {
                    reason: StrayReason::Terminated,
                    device: Some(a())
                },
                Verdict::Adopt(a())
            ]
        );
    }

    #[test]
    fn unknown_tokens_under_our_url_are_strays_and_everything_else_is_foreign() {
        let verdicts = run(
            &[
                // A departed device, or a token lost with the store.
                listed(1, Some(a()), &ours("00000000000000000000000000000000")),
                // Our token, another UE, under our URL.
                listed(2, Some(b()), &ours(TOKEN_A)),
                // Our token, another UE, elsewhere: not provably ours to delete.
                listed(
                    3,
                    Some(b()),
                    &format!("http://10.0.0.7/t8/v1/nidd/{TOKEN_A}"),
                ),
                // Another shard or AF under the same scsAsId, even for our device.
                listed(
                    4,
                    Some(a()),
                    "https://bridge-1.example:8443/nidd/t8/v1/nidd/zz",
                ),
                listed(5, Some(a()), "https://other-af.example/callbacks/nidd"),
                listed(6, None, "not a url"),
                // A group configuration under our URL whose token we do not know.
                listed(7, None, &ours("group")),
            ],
            &[],
        );
        assert_eq!(
            verdicts,
            vec![
                Verdict::Stray {
                    reason: StrayReason::UnknownCallback,
                    device: None
                },
                Verdict::Stray {
                    reason: StrayReason::OtherUe,
                    device: Some(a())
                },
                Verdict::Foreign,
                Verdict::Foreign,
                Verdict::Foreign,
                Verdict::Foreign,
                Verdict::Stray {
                    reason: StrayReason::UnknownCallback,
                    device: None
                },
            ]
        );
    }

    #[test]
    fn a_configuration_without_a_self_link_is_unaddressable() {
        let mut entry = listed(1, Some(a()), &ours(TOKEN_A));
        entry.location = None;
        assert_eq!(run(&[entry], &[]), vec![Verdict::Unaddressable]);
    }
}
