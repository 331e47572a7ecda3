//! [`LiveKeyring`]: the keyring a running process signs and verifies with, replaced whole
//! when its keyset file changes, so a rotation needs no restart.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::body::Envelope;
use crate::keys::{Edge, KeyError, Keyring, Kid};

/// A shared, replaceable [`Keyring`]. Clones share one slot: a [`LiveKeyring::replace`]
/// through any clone is seen by every verifier and publisher holding another.
///
/// Reads are lock-free (`arc-swap`): each seal or verify takes the keyring current at that
/// moment and keeps it for the whole operation, so a message is never checked against half
/// of one keyset and half of another.
#[derive(Clone)]
pub struct LiveKeyring(Arc<ArcSwap<Keyring>>);

impl LiveKeyring {
    /// Starts with `ring` (for a [`Keyring::following`] one: with the keys it follows now).
    pub fn new(ring: Keyring) -> Self {
        Self(Arc::new(ArcSwap::new(settle(ring))))
    }

    /// The keyring current now; hold it only for one operation.
    pub fn current(&self) -> Current {
        Current(self.0.load())
    }

    /// Puts `ring` in force for every later operation; returns the one it replaces.
    pub fn replace(&self, ring: Keyring) -> Arc<Keyring> {
        self.0.swap(settle(ring))
    }

    /// Seals `env` with the current keyring ([`Keyring::seal`]).
    pub fn seal(&self, env: &Envelope) -> Result<Vec<u8>, KeyError> {
        self.0.load().seal(env)
    }

    /// The kid the current keyring signs `edge` with.
    pub fn signing_kid(&self, edge: Edge) -> Option<Kid> {
        self.0.load().signing_kid(edge)
    }

    /// True when both share one slot.
    pub fn same_slot(&self, other: &LiveKeyring) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What a slot stores: always a keyring with keys of its own, never a following one, so
/// sealing and lookups through a slot never go round in a circle.
fn settle(ring: Keyring) -> Arc<Keyring> {
    match ring.follows {
        Some(live) => live.0.load_full(),
        None => Arc::new(ring),
    }
}

/// A borrowed snapshot of a [`LiveKeyring`] (see [`LiveKeyring::current`]).
pub struct Current(Guard<Arc<Keyring>>);

impl Deref for Current {
    type Target = Keyring;
    fn deref(&self) -> &Keyring {
        &self.0
    }
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self.0, f)
    }
}

impl fmt::Debug for LiveKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LiveKeyring").field(&**self.0.load()).finish()
    }
}

/// A [`Keyring::following`] keyring gives the slot it follows; any other a new slot.
impl From<Keyring> for LiveKeyring {
    fn from(ring: Keyring) -> Self {
        match &ring.follows {
            Some(live) => live.clone(),
            None => Self::new(ring),
        }
    }
}

/// As `From<Keyring>`, without copying the keys.
impl From<Arc<Keyring>> for LiveKeyring {
    fn from(ring: Arc<Keyring>) -> Self {
        match &ring.follows {
            Some(live) => live.clone(),
            None => Self(Arc::new(ArcSwap::new(ring))),
        }
    }
}

impl From<&LiveKeyring> for LiveKeyring {
    fn from(live: &LiveKeyring) -> Self {
        live.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keys::{KeysetEntry, MasterFile, MasterSecret};
    use crate::names::Role;
    use zeroize::Zeroizing;

    fn ring(generation: u32) -> Keyring {
        let m = MasterFile::new(MasterSecret::from_bytes([3; 32]));
        let kid: Kid = format!("dev>qa:{generation}").parse().unwrap();
        Keyring::from_entries([KeysetEntry {
            kid,
            secret: Some(Zeroizing::new(*m.secret.derive(&kid))),
            staged: false,
        }])
    }

    #[test]
    fn every_clone_sees_a_replacement() {
        let live = LiveKeyring::new(ring(1));
        let other = live.clone();
        let edge = Edge { from: Role::Dev, to: Role::Qa };
        assert_eq!(other.signing_kid(edge).unwrap().generation, 1);
        let old = live.replace(ring(2));
        assert_eq!(old.signing_kid(edge).unwrap().generation, 1);
        assert_eq!(other.signing_kid(edge).unwrap().generation, 2);
        assert!(live.same_slot(&other));
        assert!(!live.same_slot(&LiveKeyring::new(ring(2))));
    }

    #[test]
    fn a_following_keyring_signs_and_verifies_with_the_current_keys() {
        let live = LiveKeyring::new(ring(1));
        let follower = Arc::new(Keyring::following(&live));
        let edge = Edge { from: Role::Dev, to: Role::Qa };
        assert_eq!(follower.signing_kid(edge).unwrap().generation, 1);
        live.replace(ring(2));
        assert_eq!(follower.signing_kid(edge).unwrap().generation, 2);
        // Everything made from it shares the followed slot; a slot never stores a follower.
        assert!(LiveKeyring::from(follower.clone()).same_slot(&live));
        assert!(LiveKeyring::from((*follower).clone()).same_slot(&live));
        let settled = LiveKeyring::new((*follower).clone());
        assert!(!settled.same_slot(&live));
        live.replace(ring(3));
        assert_eq!(settled.signing_kid(edge).unwrap().generation, 2, "a snapshot, not a circle");
        assert_eq!(follower.signing_kid(edge).unwrap().generation, 3);
        let from = crate::body::Sender { role: Role::Dev, instance: crate::names::Instance::parse("dev-1").unwrap() };
        let env = Envelope::new(from, Role::Qa, 1, 1000, 0, crate::body::Heartbeat { seq: 1, busy: false }.into());
        let wire = follower.seal(&env).unwrap();
        assert!(wire.windows(b"dev>qa:3".len()).any(|w| w == b"dev>qa:3"), "sealed with generation 3");
        assert!(format!("{follower:?}").contains("following"));
    }
}
