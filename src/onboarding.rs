//! Who the bridge may create on demand, when the network names a device it does not serve
//! (the NEF's NIDD Configuration Trigger, TS 29.522): the identity rules and the count bound of
//! `[onboarding]`, and the `gpsi` forms a trigger names a device by. Sans-IO.

use crate::config::OnboardingConfig;
use crate::identity::DeviceId;

/// Why a device may not be created on demand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OnboardingRefusal {
    #[error("no [onboarding] rule allows device {0} (external_id_domains, msisdn_prefixes)")]
    NotAllowed(DeviceId),
    #[error("{max} devices were created on demand already (onboarding.max_devices)")]
    Limit { max: usize },
}

/// The `[onboarding]` rules, ready to judge identities.
#[derive(Debug, Clone, Default)]
pub(crate) struct OnboardingPolicy {
    /// Lower case, as `ExternalId` keeps its domain.
    domains: Vec<String>,
    prefixes: Vec<String>,
    max_devices: usize,
}

impl OnboardingPolicy {
    pub(crate) fn from_config(config: &OnboardingConfig) -> Self {
        Self {
            domains: config
                .external_id_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            prefixes: config.msisdn_prefixes.clone(),
            max_devices: config.max_devices,
        }
    }

    /// Whether `id` may be created now, with `created` devices created on demand so far.
    pub(crate) fn judge(&self, id: &DeviceId, created: usize) -> Result<(), OnboardingRefusal> {
        let allowed = match id {
            DeviceId::External(ext) => ext
                .as_str()
                .rsplit_once('@')
                .is_some_and(|(_, domain)| self.domains.iter().any(|d| d == domain)),
            DeviceId::Msisdn(msisdn) => self
                .prefixes
                .iter()
                .any(|p| msisdn.as_str().starts_with(p.as_str())),
        };
        if !allowed {
            return Err(OnboardingRefusal::NotAllowed(id.clone()));
        }
        if created >= self.max_devices {
            return Err(OnboardingRefusal::Limit {
                max: self.max_devices,
            });
        }
        Ok(())
    }
}

/// The device a TS 29.571 `Gpsi` names: `msisdn-<digits>` or `extid-<local@domain>`. Other
/// forms the type allows name nothing a T8 configuration can be made for.
pub(crate) fn device_of_gpsi(gpsi: &str) -> Result<DeviceId, String> {
    let parsed = if let Some(digits) = gpsi.strip_prefix("msisdn-") {
        // TS 29.571: digits only (the MSISDN parser would also take a '+' or spaces).
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("gpsi {gpsi:?}: msisdn- takes 5 to 15 digits"));
        }
        digits.parse().map(DeviceId::Msisdn)
    } else if let Some(external) = gpsi.strip_prefix("extid-") {
        external.parse().map(DeviceId::External)
    } else {
        return Err(format!(
            "gpsi {gpsi:?} is neither msisdn-<digits> nor extid-<local@domain>"
        ));
    };
    parsed.map_err(|error| format!("gpsi {gpsi:?}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(domains: &[&str], prefixes: &[&str], max_devices: usize) -> OnboardingPolicy {
        OnboardingPolicy::from_config(&OnboardingConfig {
            external_id_domains: domains.iter().map(ToString::to_string).collect(),
            msisdn_prefixes: prefixes.iter().map(ToString::to_string).collect(),
            max_devices,
            ..OnboardingConfig::default()
        })
    }

    fn id(text: &str) -> DeviceId {
        text.parse().unwrap()
    }

    #[test]
    fn identities_are_judged_by_domain_and_prefix() {
        let policy = policy(&["Fleet.Example"], &["49170"], 10);
        assert_eq!(policy.judge(&id("meter-1@fleet.example"), 0), Ok(()));
        assert_eq!(policy.judge(&id("meter-1@FLEET.example"), 0), Ok(()));
        assert_eq!(policy.judge(&id("491701234567"), 0), Ok(()));
        for refused in [
            "meter-1@other.example",
            "491711234567",
            "x@sub.fleet.example",
        ] {
            assert_eq!(
                policy.judge(&id(refused), 0),
                Err(OnboardingRefusal::NotAllowed(id(refused))),
                "{refused}"
            );
        }
    }

    #[test]
    fn nobody_is_allowed_without_a_rule_and_none_past_the_bound() {
        assert!(policy(&[], &[], 10).judge(&id("a@b.example"), 0).is_err());
        let policy = policy(&["b.example"], &[], 2);
        assert_eq!(policy.judge(&id("a@b.example"), 1), Ok(()));
        assert_eq!(
            policy.judge(&id("a@b.example"), 2),
            Err(OnboardingRefusal::Limit { max: 2 })
        );
    }

    #[test]
    fn gpsi_names_a_device_in_either_form() {
        assert_eq!(
            device_of_gpsi("msisdn-491701234567"),
            Ok(id("491701234567"))
        );
        assert_eq!(
            device_of_gpsi("extid-meter-1@Fleet.example"),
            Ok(id("meter-1@fleet.example"))
        );
        for bad in [
            "msisdn-12",
            "msisdn-+49170",
            "extid-nodomain",
            "extid-a@b@c",
            "imsi-001010000000001",
            "",
        ] {
            assert!(device_of_gpsi(bad).is_err(), "{bad}");
        }
    }
}
