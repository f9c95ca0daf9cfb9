//! A device's callback capability tokens through a rotation: the active token, the pending one
//! a rotation moves to (both accepted until the SCEF confirms the new URL), and the rule that
//! every URL handed out from the moment a rotation begins carries the newest token. Plain data;
//! the device table persists it and indexes it.

use std::sync::Arc;

/// How many characters of a token a log line may show.
const LOGGED_PREFIX: usize = 6;

/// A 128-bit random capability token, hex encoded.
pub(crate) fn mint_capability_token() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// The start of a token, enough to tell two apart in a log and useless to an attacker.
pub(crate) fn token_prefix(token: &str) -> &str {
    token.get(..LOGGED_PREFIX).unwrap_or("")
}

/// The tokens whose callback URLs reach one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallbackTokens {
    // Shared with the device table's index, not copied: one per device, never grown.
    active: Arc<str>,
    /// The token a rotation moves to, until the SCEF took its URL.
    pending: Option<Arc<str>>,
}

impl CallbackTokens {
    pub(crate) fn new(active: String, pending: Option<String>) -> Self {
        // A pending token equal to the active one would retire the only token on completion.
        let pending = pending.filter(|p| *p != active);
        Self {
            active: active.into(),
            pending: pending.map(Arc::from),
        }
    }

    pub(crate) fn active(&self) -> &str {
        &self.active
    }

    pub(crate) fn pending(&self) -> Option<&str> {
        self.pending.as_deref()
    }

    /// The token new URLs carry: the pending one during a rotation, else the active one. A
    /// configuration or subscription created meanwhile is then already on the new URL, which
    /// stays valid whatever the rotation's end.
    pub(crate) fn newest(&self) -> &str {
        self.pending.as_deref().unwrap_or(&self.active)
    }

    /// Every token accepted now (the active one first), shared.
    pub(crate) fn accepted(&self) -> impl Iterator<Item = Arc<str>> {
        std::iter::once(self.active.clone()).chain(self.pending.clone())
    }

    /// Starts a rotation, or continues the one begun before (so a retry after a failed PATCH
    /// moves to the same URL): the pending token, and whether it was minted now.
    pub(crate) fn begin_rotation(&mut self, mint: impl FnOnce() -> String) -> (String, bool) {
        if let Some(pending) = &self.pending {
            return (pending.to_string(), false);
        }
        let minted = mint();
        self.pending = Some(minted.as_str().into());
        (minted, true)
    }

    /// The SCEF took the new URL: the pending token becomes the active one. The retired
    /// token, if a rotation was under way.
    pub(crate) fn complete_rotation(&mut self) -> Option<String> {
        let pending = self.pending.take()?;
        Some(std::mem::replace(&mut self.active, pending).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_accepts_both_tokens_until_it_completes() {
        let mut tokens = CallbackTokens::new("old".into(), None);
        assert_eq!(
            tokens.accepted().map(|t| t.to_string()).collect::<Vec<_>>(),
            ["old"]
        );
        assert_eq!(tokens.newest(), "old");

        let (new, minted) = tokens.begin_rotation(|| "new".into());
        assert_eq!((new.as_str(), minted), ("new", true));
        assert_eq!(
            tokens.accepted().map(|t| t.to_string()).collect::<Vec<_>>(),
            ["old", "new"]
        );
        assert_eq!(tokens.active(), "old");
        assert_eq!(tokens.newest(), "new");

        // A retry continues the same rotation: no second token.
        let (again, minted) = tokens.begin_rotation(|| panic!("minted twice"));
        assert_eq!((again.as_str(), minted), ("new", false));

        assert_eq!(tokens.complete_rotation().as_deref(), Some("old"));
        assert_eq!(
            tokens.accepted().map(|t| t.to_string()).collect::<Vec<_>>(),
            ["new"]
        );
        assert_eq!(tokens.active(), "new");
        assert_eq!(tokens.pending(), None);
        assert_eq!(tokens.complete_rotation(), None, "nothing under way");
    }

    #[test]
    fn a_pending_token_equal_to_the_active_one_is_dropped() {
        let tokens = CallbackTokens::new("same".into(), Some("same".into()));
        assert_eq!(tokens.pending(), None);
    }

    #[test]
    fn minted_tokens_are_128_bit_hex_and_logs_see_a_prefix() {
        let token = mint_capability_token();
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(token, mint_capability_token());
        assert_eq!(token_prefix(&token), &token[..6]);
        assert_eq!(token_prefix("abc"), "");
    }
}
