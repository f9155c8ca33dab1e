//! Lock keys as the server keeps them: a random salt and HMAC-SHA256(salt, key), checked in
//! constant time, so neither the store file nor a memory dump gives a key away and a wrong
//! key's answer takes as long however much of it matched.
//!
//! A fast keyed hash (not a slow password KDF) because every read and write of a locked thing
//! is checked: lock keys are issued, high-entropy secrets, not passwords people choose.

use std::fmt;

use rand::RngCore;
use ring::hmac;

use super::disk::LockRow;

#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash {
    salt: Vec<u8>,
    tag: Vec<u8>,
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash(<salted>)")
    }
}

impl KeyHash {
    /// Hashes `key` with a fresh random salt.
    pub fn of(key: &str) -> KeyHash {
        let mut salt = vec![0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &salt), key.as_bytes())
            .as_ref()
            .to_vec();
        KeyHash { salt, tag }
    }

    /// Whether `key` is the key, compared in constant time.
    pub fn verify(&self, key: &str) -> bool {
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, &self.salt),
            key.as_bytes(),
            &self.tag,
        )
        .is_ok()
    }

    /// As stored, with the thing the lock is attached to.
    pub fn to_row(&self, thing: Option<String>) -> LockRow {
        LockRow {
            salt: hex(&self.salt),
            hash: hex(&self.tag),
            thing,
        }
    }

    /// From a stored row; `None` when the row is damaged.
    pub fn from_row(row: &LockRow) -> Option<KeyHash> {
        Some(KeyHash {
            salt: unhex(&row.salt)?,
            tag: unhex(&row.hash)?,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_verifies_and_others_do_not_and_nothing_shows_it() {
        let hash = KeyHash::of("key-a-7f3d91");
        assert!(hash.verify("key-a-7f3d91"));
        assert!(!hash.verify("key-a-7f3d9"));
        assert!(!hash.verify(""));
        let row = hash.to_row(Some("thing".to_owned()));
        let text = serde_json::to_string(&row).unwrap() + &format!("{hash:?}");
        assert!(!text.contains("key-a-7f3d91"), "{text}");
        let back = KeyHash::from_row(&row).unwrap();
        assert!(back.verify("key-a-7f3d91"));
        assert_ne!(
            KeyHash::of("same").to_row(None).hash,
            KeyHash::of("same").to_row(None).hash,
            "salted: the same key hashes differently"
        );
        assert!(
            KeyHash::from_row(&LockRow {
                salt: "zz".into(),
                hash: "00".into(),
                thing: None
            })
            .is_none()
        );
    }
}
