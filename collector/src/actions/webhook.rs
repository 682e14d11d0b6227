//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>, the symmetric `v1`
//! scheme): a message is signed as `HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")`
//! and sent with the headers
//!
//! ```text
//! webhook-id: rb_5d1c…              (the rebuild action's id: the same on every retry)
//! webhook-timestamp: 1764166800     (Unix seconds of this attempt)
//! webhook-signature: v1,<base64 of the 32-byte MAC>
//! ```
//!
//! The secret is `whsec_` followed by the base64 of the key (24 to 64 random bytes, as the
//! specification recommends). A receiver accepts a message when the timestamp is within its
//! tolerance and *any* of the space-separated `v1,` signatures matches (several are sent while a
//! secret is being rotated); other versions (`v1a,` for asymmetric keys) are skipped.
//!
//! Pure: no I/O and no clock (the caller passes the time in). `ring::hmac` does the MAC and its
//! constant-time verification.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

/// Header names of the scheme.
pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// The prefix of a Standard Webhooks symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// The tolerance the specification's reference libraries use for the timestamp.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// The specification asks for keys of 24 to 64 bytes.
const MIN_KEY_BYTES: usize = 24;
const MAX_KEY_BYTES: usize = 64;

/// Why a secret was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the webhook secret must start with {SECRET_PREFIX:?} followed by base64")]
    NoPrefix,
    #[error("the webhook secret after {SECRET_PREFIX:?} is not valid base64: {0}")]
    Base64(String),
    #[error("the webhook secret key is {0} bytes; it must be 24 to 64 bytes")]
    Length(usize),
}

/// Why a message was refused by [`Secret::verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the {0} header is missing or empty")]
    MissingHeader(&'static str),
    #[error("the webhook-timestamp header {0:?} is not a whole number of seconds")]
    BadTimestamp(String),
    #[error("the message timestamp is {0} s away from now, beyond the tolerance")]
    OutsideTolerance(i64),
    #[error("no v1 signature in the webhook-signature header matches")]
    NoMatch,
}

/// A webhook signing key.
#[derive(Clone)]
pub struct Secret {
    key: hmac::Key,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>` (surrounding whitespace, e.g. a file's trailing newline, is
    /// ignored).
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        let b64 = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::NoPrefix)?;
        let key = STANDARD
            .decode(b64)
            .map_err(|e| SecretError::Base64(e.to_string()))?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Secret::from_key(&key))
    }

    /// A secret from raw key bytes (no length check: for tests and for interoperating with
    /// receivers that chose shorter keys).
    pub fn from_key(key: &[u8]) -> Secret {
        Secret {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// The `webhook-signature` value for one message: `v1,<base64 MAC>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = hmac::sign(&self.key, &signed_content(id, timestamp, body));
        format!("v1,{}", STANDARD.encode(tag.as_ref()))
    }

    /// The three headers for one attempt, in order (id, timestamp, signature).
    pub fn headers(&self, id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 3] {
        [
            (HEADER_ID, id.to_string()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_SIGNATURE, self.sign(id, timestamp, body)),
        ]
    }

    /// Verifies a received message as a receiver would: the headers' values (`None` when
    /// absent), the raw body, the receiver's clock in Unix seconds and its tolerance. Returns
    /// the message id.
    pub fn verify<'a>(
        &self,
        id: Option<&'a str>,
        timestamp: Option<&str>,
        signatures: Option<&str>,
        body: &[u8],
        now_s: i64,
        tolerance: Duration,
    ) -> Result<&'a str, VerifyError> {
        let id = id
            .filter(|s| !s.is_empty())
            .ok_or(VerifyError::MissingHeader(HEADER_ID))?;
        let ts_text = timestamp
            .filter(|s| !s.is_empty())
            .ok_or(VerifyError::MissingHeader(HEADER_TIMESTAMP))?;
        let sigs = signatures
            .filter(|s| !s.trim().is_empty())
            .ok_or(VerifyError::MissingHeader(HEADER_SIGNATURE))?;
        let ts: i64 = ts_text
            .trim()
            .parse()
            .map_err(|_| VerifyError::BadTimestamp(ts_text.to_string()))?;
        let skew = ts.saturating_sub(now_s);
        let tol = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
        // Like the reference libraries: a message exactly `tolerance` old is already refused.
        if skew <= -tol || skew > tol {
            return Err(VerifyError::OutsideTolerance(skew));
        }
        let content = signed_content(id, ts, body);
        for sig in sigs.split(' ').filter(|s| !s.is_empty()) {
            let Some(b64) = sig.strip_prefix("v1,") else {
                continue;
            };
            let Ok(tag) = STANDARD.decode(b64) else {
                continue;
            };
            if hmac::verify(&self.key, &content, &tag).is_ok() {
                return Ok(id);
            }
        }
        Err(VerifyError::NoMatch)
    }
}

/// `"{id}.{timestamp}.{body}"` as bytes (the body is not necessarily UTF-8 for the scheme).
fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let ts = timestamp.to_string();
    let mut v = Vec::with_capacity(id.len() + ts.len() + body.len() + 2);
    v.extend_from_slice(id.as_bytes());
    v.push(b'.');
    v.extend_from_slice(ts.as_bytes());
    v.push(b'.');
    v.extend_from_slice(body);
    v
}

/// A fresh `whsec_` secret with a 32-byte random key (for `docs/` examples and tests).
pub fn generate_secret() -> Result<String, ring::error::Unspecified> {
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The published test vector of the Standard Webhooks reference libraries:
    // github.com/standard-webhooks/standard-webhooks, libraries/go/webhook_test.go,
    // `TestWebhookSign` (commit 449485caf9c0303530c19524fbe4096680aafcf1); the same key,
    // message id, timestamp, payload and signature appear in the other libraries' tests.
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TIMESTAMP: i64 = 1_614_265_330;
    const VECTOR_PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn vector_secret() -> Secret {
        // The vector's key is 24 bytes, the specification's minimum.
        Secret::parse(VECTOR_SECRET).unwrap()
    }

    #[test]
    fn signs_the_published_test_vector() {
        let s = vector_secret();
        assert_eq!(
            s.sign(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD),
            VECTOR_SIGNATURE
        );
    }

    #[test]
    fn verifies_the_published_test_vector() {
        let s = vector_secret();
        let id = s
            .verify(
                Some(VECTOR_ID),
                Some(&VECTOR_TIMESTAMP.to_string()),
                Some(VECTOR_SIGNATURE),
                VECTOR_PAYLOAD,
                VECTOR_TIMESTAMP + 10,
                DEFAULT_TOLERANCE,
            )
            .unwrap();
        assert_eq!(id, VECTOR_ID);
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let s = vector_secret();
        // As in the reference tests: wrong v1, a v2, the right one, wrong v1.
        let header = format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= \
             v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {VECTOR_SIGNATURE} \
             v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
        );
        let ts = VECTOR_TIMESTAMP.to_string();
        let ok = s.verify(
            Some(VECTOR_ID),
            Some(&ts),
            Some(&header),
            VECTOR_PAYLOAD,
            VECTOR_TIMESTAMP,
            DEFAULT_TOLERANCE,
        );
        assert_eq!(ok, Ok(VECTOR_ID));
        let only_wrong = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1a,abc v1,!!!";
        assert_eq!(
            s.verify(
                Some(VECTOR_ID),
                Some(&ts),
                Some(only_wrong),
                VECTOR_PAYLOAD,
                VECTOR_TIMESTAMP,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn refuses_changed_body_id_or_timestamp() {
        let s = vector_secret();
        let ts = VECTOR_TIMESTAMP.to_string();
        let now = VECTOR_TIMESTAMP;
        let tol = DEFAULT_TOLERANCE;
        let sig = Some(VECTOR_SIGNATURE);
        assert_eq!(
            s.verify(
                Some(VECTOR_ID),
                Some(&ts),
                sig,
                br#"{"test": 2432232315}"#,
                now,
                tol
            ),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            s.verify(Some("msg_other"), Some(&ts), sig, VECTOR_PAYLOAD, now, tol),
            Err(VerifyError::NoMatch)
        );
        let later = (VECTOR_TIMESTAMP + 1).to_string();
        assert_eq!(
            s.verify(Some(VECTOR_ID), Some(&later), sig, VECTOR_PAYLOAD, now, tol),
            Err(VerifyError::NoMatch)
        );
        let other = Secret::parse(&generate_secret().unwrap()).unwrap();
        assert_eq!(
            other.verify(Some(VECTOR_ID), Some(&ts), sig, VECTOR_PAYLOAD, now, tol),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn timestamp_tolerance_both_ways() {
        let s = vector_secret();
        let ts = VECTOR_TIMESTAMP.to_string();
        let tol = DEFAULT_TOLERANCE;
        let check = |now: i64| {
            s.verify(
                Some(VECTOR_ID),
                Some(&ts),
                Some(VECTOR_SIGNATURE),
                VECTOR_PAYLOAD,
                now,
                tol,
            )
        };
        assert!(check(VECTOR_TIMESTAMP + 299).is_ok());
        assert_eq!(
            check(VECTOR_TIMESTAMP + 300),
            Err(VerifyError::OutsideTolerance(-300))
        );
        assert!(check(VECTOR_TIMESTAMP - 300).is_ok());
        assert_eq!(
            check(VECTOR_TIMESTAMP - 301),
            Err(VerifyError::OutsideTolerance(301))
        );
    }

    #[test]
    fn missing_or_bad_headers_are_named() {
        let s = vector_secret();
        let ts = VECTOR_TIMESTAMP.to_string();
        let v = |id, t, sig| {
            s.verify(
                id,
                t,
                sig,
                VECTOR_PAYLOAD,
                VECTOR_TIMESTAMP,
                DEFAULT_TOLERANCE,
            )
        };
        assert_eq!(
            v(None, Some(&ts), Some(VECTOR_SIGNATURE)),
            Err(VerifyError::MissingHeader(HEADER_ID))
        );
        assert_eq!(
            v(Some(VECTOR_ID), None, Some(VECTOR_SIGNATURE)),
            Err(VerifyError::MissingHeader(HEADER_TIMESTAMP))
        );
        assert_eq!(
            v(Some(VECTOR_ID), Some(&ts), Some(" ")),
            Err(VerifyError::MissingHeader(HEADER_SIGNATURE))
        );
        assert_eq!(
            v(Some(VECTOR_ID), Some("soon"), Some(VECTOR_SIGNATURE)),
            Err(VerifyError::BadTimestamp("soon".into()))
        );
    }

    #[test]
    fn secrets_are_checked() {
        assert_eq!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::NoPrefix
        );
        assert!(matches!(
            Secret::parse("whsec_not base64!").unwrap_err(),
            SecretError::Base64(_)
        ));
        assert_eq!(
            Secret::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::Length(5)
        );
        // A file's trailing newline is fine.
        assert!(Secret::parse(&format!("{VECTOR_SECRET}\n")).is_ok());
        let fresh = generate_secret().unwrap();
        assert!(fresh.starts_with(SECRET_PREFIX));
        let s = Secret::parse(&fresh).unwrap();
        let sig = s.sign("rb_1", 1_700_000_000, b"{}");
        assert_eq!(
            s.verify(
                Some("rb_1"),
                Some("1700000000"),
                Some(&sig),
                b"{}",
                1_700_000_000,
                DEFAULT_TOLERANCE
            ),
            Ok("rb_1")
        );
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
