//! Enrollment tokens: `dwt_<id>_<secret>` — an 8-hex-digit public id (for listings and audit)
//! and 32 random bytes (base64url, unpadded). Only the SHA-256 of the whole string is stored;
//! the token itself is printed once, when it is made.
//!
//! Pure apart from the random generator: checking, expiry and use counting belong to storage
//! (`Storage::consume_enrollment_token`), one atomic transaction.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;

use crate::storage::EnrollmentToken;

const PREFIX: &str = "dwt_";
const ID_LEN: usize = 8;
const SECRET_BYTES: usize = 32;

/// A token in its printable form, with its id and stored hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    text: String,
}

impl std::fmt::Debug for Token {
    // Never print the secret by accident.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({PREFIX}{}_…)", self.id())
    }
}

/// A string that is not a token (refused before any database lookup).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed enrollment token (expected dwt_<8 hex digits>_<43 base64url characters>)")]
pub struct MalformedToken;

/// Random bytes could not be had from the OS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

impl Token {
    /// A new random token.
    pub fn generate() -> Result<Token, RandomError> {
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; ID_LEN / 2];
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill(&mut id).map_err(|_| RandomError)?;
        rng.fill(&mut secret).map_err(|_| RandomError)?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Token {
            text: format!("{PREFIX}{id}_{}", URL_SAFE_NO_PAD.encode(secret)),
        })
    }

    /// Parses a token as an agent sent it (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<Token, MalformedToken> {
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).ok_or(MalformedToken)?;
        let (id, secret) = rest.split_at_checked(ID_LEN).ok_or(MalformedToken)?;
        if !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(MalformedToken);
        }
        let secret = secret.strip_prefix('_').ok_or(MalformedToken)?;
        match URL_SAFE_NO_PAD.decode(secret) {
            Ok(bytes) if bytes.len() == SECRET_BYTES => Ok(Token {
                text: s.to_string(),
            }),
            _ => Err(MalformedToken),
        }
    }

    /// The public id.
    pub fn id(&self) -> &str {
        &self.text[PREFIX.len()..PREFIX.len() + ID_LEN]
    }

    /// What is stored: SHA-256 of the whole token string.
    pub fn sha256(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, self.text.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// The token as printed for the operator (once).
    pub fn reveal(&self) -> &str {
        &self.text
    }

    /// The row to store for this token.
    pub fn record(
        &self,
        created_ms: i64,
        expires_ms: i64,
        uses: u32,
        host_pattern: Option<String>,
    ) -> EnrollmentToken {
        EnrollmentToken {
            id: self.id().to_string(),
            secret_sha256: self.sha256(),
            created_ms,
            expires_ms,
            uses_left: uses,
            host_pattern,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_back() {
        for _ in 0..50 {
            let t = Token::generate().unwrap();
            assert_eq!(t.reveal().len(), 4 + 8 + 1 + 43);
            let back = Token::parse(&format!(" {}\n", t.reveal())).unwrap();
            assert_eq!(back, t);
            assert_eq!(back.sha256(), t.sha256());
            assert!(!format!("{t:?}").contains(&t.reveal()[13..]));
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = Token::generate().unwrap().reveal().to_string();
        let secret = &good[13..];
        for bad in [
            "".to_string(),
            "dwt_".into(),
            good.replacen("dwt_", "dwx_", 1),
            format!("dwt_ABCDEF01_{secret}"),
            format!("dwt_abcdef0_{secret}"),
            format!("dwt_abcdef01{secret}"),
            format!("dwt_abcdef01_{}", &secret[1..]),
            format!("dwt_abcdef01_{secret}A"),
            format!("dwt_abcdef01_{}=", &secret[..42]),
        ] {
            assert_eq!(Token::parse(&bad), Err(MalformedToken), "{bad:?}");
        }
    }

    #[test]
    fn secret_may_contain_underscores() {
        // base64url uses '_' and '-': the id is found by length, not by splitting.
        let t = format!("dwt_0123abcd_{}", URL_SAFE_NO_PAD.encode([0xff; 32]));
        assert!(t[13..].contains('_'));
        assert_eq!(Token::parse(&t).unwrap().id(), "0123abcd");
    }
}
