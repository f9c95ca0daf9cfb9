//! The `anyip` backend's address pool: one address per device out of a CIDR prefix (IPv4 or
//! IPv6), the persisted address claimed first, the next free one otherwise, and released
//! addresses reused only once every never-used address is gone. It holds nothing per address
//! but the addresses in use and the released ones waiting to be reused, so 100 000 devices cost
//! a few MiB whatever the prefix's size.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;

use ipnet::{IpAddrRange, IpNet};

use crate::config::AddressPrefix;

/// Why the pool cannot give out an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PrefixPoolError {
    #[error("{address} is not a host address of the prefix {prefix}")]
    OutsidePrefix { address: IpAddr, prefix: IpNet },
    #[error("{address} is already in use by another device")]
    Taken { address: IpAddr },
    #[error("every one of the {capacity} addresses of the prefix {prefix} is in use")]
    Exhausted { prefix: IpNet, capacity: u128 },
}

/// The addresses of one prefix, handed out to devices.
///
/// Host addresses are those of [`IpNet::hosts`] and [`AddressPrefix::host_count`]: for an IPv4
/// prefix shorter than /31, all but the network and broadcast addresses; every address of a /31
/// or /32 and of an IPv6 prefix.
#[derive(Debug)]
pub(crate) struct PrefixPool {
    prefix: IpNet,
    capacity: u128,
    /// The addresses never handed out by `allocate`, in order; ones claimed meanwhile are
    /// skipped when reached.
    never_used: IpAddrRange,
    in_use: HashSet<IpAddr>,
    /// Addresses given back, oldest first, reused after every never-used address so a server
    /// still talking to a removed device meets somebody new as late as possible.
    released: VecDeque<IpAddr>,
    /// The same addresses as `released`, to look them up.
    waiting: HashSet<IpAddr>,
}

impl PrefixPool {
    /// A pool of every host address of `prefix`.
    pub(crate) fn new(prefix: AddressPrefix) -> Self {
        let capacity = prefix.host_count();
        let prefix = prefix.net();
        Self {
            prefix,
            capacity,
            never_used: prefix.hosts(),
            in_use: HashSet::new(),
            released: VecDeque::new(),
            waiting: HashSet::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn prefix(&self) -> IpNet {
        self.prefix
    }

    /// How many devices the prefix can hold at once (saturating at `u128::MAX` for `::/0`).
    pub(crate) fn capacity(&self) -> u128 {
        self.capacity
    }

    /// How many addresses devices hold.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Whether `address` is one of the prefix's host addresses.
    pub(crate) fn contains(&self, address: IpAddr) -> bool {
        self.prefix.contains(&address)
            && !(matches!(self.prefix, IpNet::V4(net) if net.prefix_len() < 31)
                && (address == self.prefix.network() || address == self.prefix.broadcast()))
    }

    /// Takes `address` for a device that had it before (its persisted address).
    pub(crate) fn claim(&mut self, address: IpAddr) -> Result<(), PrefixPoolError> {
        if !self.contains(address) {
            return Err(PrefixPoolError::OutsidePrefix {
                address,
                prefix: self.prefix,
            });
        }
        if !self.in_use.insert(address) {
            return Err(PrefixPoolError::Taken { address });
        }
        // A released address waiting for reuse may be claimed back (rare: a scan is fine).
        if self.waiting.remove(&address) {
            self.released.retain(|waiting| *waiting != address);
        }
        Ok(())
    }

    /// Takes the next address never used, or once there is none, the one released longest ago.
    pub(crate) fn allocate(&mut self) -> Result<IpAddr, PrefixPoolError> {
        for address in self.never_used.by_ref() {
            if !self.waiting.contains(&address) && self.in_use.insert(address) {
                return Ok(address);
            }
        }
        if let Some(address) = self.released.pop_front() {
            self.waiting.remove(&address);
            self.in_use.insert(address);
            return Ok(address);
        }
        Err(PrefixPoolError::Exhausted {
            prefix: self.prefix,
            capacity: self.capacity(),
        })
    }

    /// Gives `address` back; false if no device held it.
    pub(crate) fn release(&mut self, address: IpAddr) -> bool {
        if !self.in_use.remove(&address) {
            return false;
        }
        self.waiting.insert(address);
        self.released.push_back(address);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(prefix: &str) -> PrefixPool {
        PrefixPool::new(prefix.parse::<AddressPrefix>().unwrap())
    }

    fn ip(address: &str) -> IpAddr {
        address.parse().unwrap()
    }

    #[test]
    fn allocates_in_order_skipping_network_and_claimed_addresses() {
        let mut p = pool("127.64.0.0/10");
        assert_eq!(p.prefix().to_string(), "127.64.0.0/10");
        assert_eq!(p.capacity(), (1 << 22) - 2);
        assert_eq!(p.allocate(), Ok(ip("127.64.0.1")));
        p.claim(ip("127.64.0.2")).unwrap();
        p.claim(ip("127.64.200.7")).unwrap();
        p.claim(ip("127.100.3.4")).unwrap();
        assert_eq!(p.allocate(), Ok(ip("127.64.0.3")));
        assert_eq!(p.in_use(), 5);
        assert_eq!(
            p.claim(ip("127.64.200.7")),
            Err(PrefixPoolError::Taken {
                address: ip("127.64.200.7")
            })
        );
    }

    #[test]
    fn addresses_outside_the_prefix_are_refused() {
        let mut p = pool("127.64.0.0/10");
        for outside in [
            "127.0.0.1",
            "127.128.0.1",
            "127.64.0.0",
            "127.127.255.255",
            "::1",
        ] {
            assert!(
                matches!(
                    p.claim(ip(outside)),
                    Err(PrefixPoolError::OutsidePrefix { .. })
                ),
                "{outside}"
            );
        }
        assert!(!p.release(ip("127.0.0.1")));
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn a_tiny_prefix_runs_out_and_reuses_what_is_released() {
        let mut p = pool("10.0.0.0/30");
        assert_eq!(p.capacity(), 2);
        assert_eq!(p.allocate(), Ok(ip("10.0.0.1")));
        assert_eq!(p.allocate(), Ok(ip("10.0.0.2")));
        let exhausted = p.allocate().unwrap_err();
        assert_eq!(
            exhausted,
            PrefixPoolError::Exhausted {
                prefix: "10.0.0.0/30".parse().unwrap(),
                capacity: 2
            }
        );
        assert_eq!(
            exhausted.to_string(),
            "every one of the 2 addresses of the prefix 10.0.0.0/30 is in use"
        );
        assert!(p.release(ip("10.0.0.2")));
        assert!(!p.release(ip("10.0.0.2")), "released twice");
        assert!(p.release(ip("10.0.0.1")));
        // Oldest release first.
        assert_eq!(p.allocate(), Ok(ip("10.0.0.2")));
        assert_eq!(p.allocate(), Ok(ip("10.0.0.1")));
        assert!(p.allocate().is_err());
    }

    #[test]
    fn released_addresses_wait_until_every_never_used_one_is_gone() {
        let mut p = pool("192.168.0.0/29");
        assert_eq!(p.capacity(), 6);
        let first = p.allocate().unwrap();
        // Claimed (persisted) ahead of the cursor, then released: it must not come back early.
        p.claim(ip("192.168.0.3")).unwrap();
        assert!(p.release(first));
        assert!(p.release(ip("192.168.0.3")));
        let order: Vec<_> = std::iter::from_fn(|| p.allocate().ok()).collect();
        assert_eq!(
            order,
            ["192.168.0.2", "192.168.0.4", "192.168.0.5", "192.168.0.6"]
                .into_iter()
                .chain(["192.168.0.1", "192.168.0.3"])
                .map(ip)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_released_address_can_be_claimed_back_and_is_then_not_handed_out_twice() {
        let mut p = pool("10.0.0.0/30");
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        assert!(p.release(a));
        p.claim(a).unwrap();
        assert!(p.allocate().is_err(), "a is in use again, b too");
        assert!(p.release(b));
        assert!(p.release(a));
        let again: Vec<_> = std::iter::from_fn(|| p.allocate().ok()).collect();
        assert_eq!(again, [b, a], "a's first release no longer counts");
    }

    #[test]
    fn short_prefixes_keep_every_address() {
        let mut p = pool("10.0.0.4/31");
        assert_eq!(p.capacity(), 2);
        assert_eq!(p.allocate(), Ok(ip("10.0.0.4")));
        assert_eq!(p.allocate(), Ok(ip("10.0.0.5")));
        let mut one = pool("10.0.0.9/32");
        assert_eq!(one.capacity(), 1);
        assert_eq!(one.allocate(), Ok(ip("10.0.0.9")));
        assert!(one.allocate().is_err());
    }

    #[test]
    fn ipv6_prefixes_use_every_address() {
        let mut p = pool("fd00::/120");
        assert_eq!(p.capacity(), 256);
        assert_eq!(p.allocate(), Ok(ip("fd00::")));
        p.claim(ip("fd00::ff")).unwrap();
        assert!(matches!(
            p.claim(ip("fd00::100")),
            Err(PrefixPoolError::OutsidePrefix { .. })
        ));
        assert!(matches!(
            p.claim(ip("10.0.0.1")),
            Err(PrefixPoolError::OutsidePrefix { .. })
        ));
        let rest: Vec<_> = std::iter::from_fn(|| p.allocate().ok()).collect();
        assert_eq!(rest.len(), 254);
        assert_eq!(rest.last(), Some(&ip("fd00::fe")));
        assert_eq!(p.in_use(), 256);
        assert_eq!(pool("fd00::/64").capacity(), 1 << 64);
        assert_eq!(pool("::/0").capacity(), u128::MAX);
    }

    /// The pool holds the addresses in use, not the prefix: 100 000 devices out of a /10.
    #[test]
    fn a_hundred_thousand_devices() {
        let mut p = pool("127.64.0.0/10");
        for _ in 0..100_000 {
            p.allocate().unwrap();
        }
        assert_eq!(p.in_use(), 100_000);
        assert_eq!(p.allocate(), Ok(ip("127.65.134.161")));
    }
}
