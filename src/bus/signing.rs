//! Envelope signatures (opt-in, `[redis] signing_keys`): who may write what bots act on.
//!
//! A signed envelope is the unsigned one with two members appended before its closing
//! brace (docs/protocol.md §3, "Signed envelopes"):
//!
//! ```text
//! {"src":"…","seq":7,"ts_pub":…,"event":{…},"kid":"k1","sig":"<64 lower-case hex>"}
//! └──────────────── body ─────────────────┘
//! sig = HMAC-SHA256(secret of kid, channel + "\n" + body)
//! ```
//!
//! `body` is every byte before `,"kid":"`, `channel` the channel name without the key
//! prefix (`trade:binance:BTC-USDT`). Binding the channel means an envelope signed for
//! one channel is refused on any other. Signing is a suffix over the bytes as sent, so
//! neither side re-serializes JSON, and a verifier in any language needs only string
//! operations and an HMAC.
//!
//! [`Keyring`] holds the configured keys: the first one signs, every one verifies (key
//! rotation). It owns no I/O; the envelope codec calls it. Secrets never appear in its
//! `Debug` output, only key ids.

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{RedisConfig, SigningKey};

type HmacSha256 = Hmac<Sha256>;

/// Length of the hex signature.
pub const SIG_HEX_LEN: usize = 64;
const KID_OPEN: &[u8] = b",\"kid\":\"";
const SIG_OPEN: &[u8] = b"\",\"sig\":\"";
const TAIL: &[u8] = b"\"}";
/// Longest key id (see `SigningKey`).
pub const MAX_KID_LEN: usize = 32;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("envelope is not signed")]
    Unsigned,
    #[error("envelope is signed with an unknown key id")]
    UnknownKey,
    #[error("envelope signature does not match")]
    Mismatch,
}

/// The signing keys of `[redis] signing_keys`, ready to use (keyed HMAC states).
pub struct Keyring {
    /// `(kid, HMAC keyed with its secret)`; the first signs.
    keys: Vec<(String, HmacSha256)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "kids",
                &self
                    .keys
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// `None` when no key is configured (signing off).
    pub fn new(keys: &[SigningKey]) -> Option<Keyring> {
        let keys: Vec<(String, HmacSha256)> = keys
            .iter()
            .filter_map(|k| {
                // HMAC takes keys of any length: this cannot fail.
                HmacSha256::new_from_slice(k.secret().as_bytes())
                    .ok()
                    .map(|m| (k.kid().to_string(), m))
            })
            .collect();
        (!keys.is_empty()).then_some(Keyring { keys })
    }

    /// The keyring of `config`, shared; `None` when signing is off.
    pub fn from_config(config: &RedisConfig) -> Option<Arc<Keyring>> {
        Keyring::new(&config.signing_keys).map(Arc::new)
    }

    /// The key id new envelopes are signed with.
    pub fn signing_kid(&self) -> &str {
        &self.keys[0].0
    }

    /// Signs `buf`, an envelope without its closing brace, for `channel`, and closes it:
    /// appends `,"kid":"<kid>","sig":"<hex>"}`.
    pub fn seal(&self, channel: &str, buf: &mut BytesMut) {
        let (kid, key) = &self.keys[0];
        let tag = mac(key, channel, buf).finalize().into_bytes();
        buf.reserve(KID_OPEN.len() + kid.len() + SIG_OPEN.len() + SIG_HEX_LEN + TAIL.len());
        buf.put_slice(KID_OPEN);
        buf.put_slice(kid.as_bytes());
        buf.put_slice(SIG_OPEN);
        for b in tag {
            buf.put_u8(HEX[usize::from(b >> 4)]);
            buf.put_u8(HEX[usize::from(b & 0x0f)]);
        }
        buf.put_slice(TAIL);
    }

    /// Checks that `payload` is an envelope for `channel` signed with one of the keys.
    pub fn verify(&self, channel: &str, payload: &[u8]) -> Result<(), SignatureError> {
        let signed = split(payload).ok_or(SignatureError::Unsigned)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(kid, _)| kid.as_bytes() == signed.kid)
            .ok_or(SignatureError::UnknownKey)?;
        // The stream id is written by Redis after signing: it is not covered.
        let m = match crate::envelope::id_field(signed.body) {
            Some(id) => {
                let mut m = mac(key, channel, &signed.body[..id.start]);
                m.update(&signed.body[id.end..]);
                m
            }
            None => mac(key, channel, signed.body),
        };
        m.verify_slice(&signed.sig)
            .map_err(|_| SignatureError::Mismatch)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn mac(key: &HmacSha256, channel: &str, body: &[u8]) -> HmacSha256 {
    let mut m = key.clone();
    m.update(channel.as_bytes());
    m.update(b"\n");
    m.update(body);
    m
}

/// The parts of a signed envelope.
struct Signed<'a> {
    body: &'a [u8],
    kid: &'a [u8],
    sig: [u8; SIG_HEX_LEN / 2],
}

/// Splits `…,"kid":"<kid>","sig":"<hex>"}` from the end; `None` if it is not that shape.
fn split(payload: &[u8]) -> Option<Signed<'_>> {
    let rest = payload.strip_suffix(TAIL)?;
    let hex_at = rest.len().checked_sub(SIG_HEX_LEN)?;
    let (rest, hex) = rest.split_at(hex_at);
    let rest = rest.strip_suffix(SIG_OPEN)?;
    // The key id is short and has no quotes: look for its opening in the last few bytes.
    let window = rest.len().saturating_sub(MAX_KID_LEN + KID_OPEN.len());
    let open = rest[window..]
        .windows(KID_OPEN.len())
        .rposition(|w| w == KID_OPEN)?
        + window;
    let kid = &rest[open + KID_OPEN.len()..];
    if kid.is_empty() || !kid.iter().all(|&b| kid_byte(b)) {
        return None;
    }
    let mut sig = [0u8; SIG_HEX_LEN / 2];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        sig[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(Signed {
        body: &rest[..open],
        kid,
        sig,
    })
}

fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Bytes allowed in a key id: ASCII letters, digits, `_`, `-`, `.`.
pub fn kid_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&str]) -> Keyring {
        let keys: Vec<SigningKey> = keys.iter().map(|k| k.parse().unwrap()).collect();
        Keyring::new(&keys).unwrap()
    }

    const BODY: &[u8] = br#"{"src":"6f1c8e9a-3a4b-4c5d-8e9f-0a1b2c3d4e5f","seq":1,"ts_pub":1,"event":{"type":"status","exchange":"sim","ts":null,"ts_recv":1,"state":"connected","detail":null}"#;
    const CHANNEL: &str = "status:sim";

    fn sealed(r: &Keyring, channel: &str) -> Vec<u8> {
        let mut buf = BytesMut::from(BODY);
        r.seal(channel, &mut buf);
        buf.to_vec()
    }

    #[test]
    fn sign_then_verify_and_the_wire_shape() {
        let r = ring(&["k1=0123456789abcdef0123"]);
        let env = sealed(&r, CHANNEL);
        assert_eq!(r.verify(CHANNEL, &env), Ok(()));
        let text = std::str::from_utf8(&env).unwrap();
        assert!(text.starts_with(std::str::from_utf8(BODY).unwrap()));
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["kid"], "k1");
        assert_eq!(v["sig"].as_str().unwrap().len(), 64);
        // The documented recipe, computed independently of `seal`.
        let mut m = HmacSha256::new_from_slice(b"0123456789abcdef0123").unwrap();
        m.update(b"status:sim\n");
        m.update(BODY);
        let want: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v["sig"], want.as_str());
    }

    #[test]
    fn every_listed_key_verifies_for_rotation() {
        let old = ring(&["k0=old-secret-0123456789"]);
        let rotated = ring(&["k1=new-secret-0123456789", "k0=old-secret-0123456789"]);
        assert_eq!(rotated.signing_kid(), "k1");
        assert_eq!(rotated.verify(CHANNEL, &sealed(&old, CHANNEL)), Ok(()));
        assert_eq!(rotated.verify(CHANNEL, &sealed(&rotated, CHANNEL)), Ok(()));
        assert_eq!(
            old.verify(CHANNEL, &sealed(&rotated, CHANNEL)),
            Err(SignatureError::UnknownKey),
            "a key removed from the list no longer verifies"
        );
    }

    #[test]
    fn tampering_unknown_keys_and_unsigned_envelopes_are_refused() {
        let r = ring(&["k1=0123456789abcdef0123"]);
        let env = sealed(&r, CHANNEL);
        let text = String::from_utf8(env.clone()).unwrap();

        let tampered = text.replace("\"connected\"", "\"resync\"\u{20}\u{20}");
        assert_eq!(
            r.verify(CHANNEL, tampered.as_bytes()),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            r.verify("status:kraken", &env),
            Err(SignatureError::Mismatch),
            "bound to its channel"
        );
        let other = ring(&["k1=another-secret-456789"]);
        assert_eq!(
            other.verify(CHANNEL, &env),
            Err(SignatureError::Mismatch),
            "same kid, other secret"
        );
        let unknown = text.replace("\"kid\":\"k1\"", "\"kid\":\"k9\"");
        assert_eq!(
            r.verify(CHANNEL, unknown.as_bytes()),
            Err(SignatureError::UnknownKey)
        );
        let mut unsigned = BODY.to_vec();
        unsigned.push(b'}');
        let bad: Vec<Vec<u8>> = vec![
            unsigned,
            Vec::new(),
            b"\"}".to_vec(),
            text.replace("\"sig\":\"", "\"sig\":\"X").into_bytes(),
            text.to_uppercase().into_bytes(),
            text.replace("\"kid\":\"k1\"", "\"kid\":\"k\\\"1\"")
                .into_bytes(),
        ];
        for b in bad {
            assert!(
                r.verify(CHANNEL, &b).is_err(),
                "{}",
                String::from_utf8_lossy(&b)
            );
        }
    }

    #[test]
    fn debug_output_shows_key_ids_only() {
        let r = ring(&["k1=super-secret-value-123"]);
        let shown = format!("{r:?}");
        assert!(shown.contains("k1"), "{shown}");
        assert!(!shown.contains("super-secret"), "{shown}");
    }
}
