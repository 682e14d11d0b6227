//! Bearer secrets of two kinds, one format: `<prefix>_<id>_<secret>` — a kind prefix (`dwt`
//! enrollment tokens, `dwa` API tokens), an 8-hex-digit public id (for listings and audit) and
//! 32 random bytes (base64url, unpadded). Only the SHA-256 of the whole string is stored; the
//! token itself is printed once, when it is made.
//!
//! Pure apart from the random generator: checking, expiry, use counting and roles belong to
//! storage (`Storage::consume_enrollment_token`, `AccessStore::api_token_by_hash`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;

use crate::storage::EnrollmentToken;

const ID_LEN: usize = 8;
const SECRET_BYTES: usize = 32;

/// What a token is for; the prefix says it, so one kind is never accepted as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `dwt_…`: lets an agent enroll (`driftwatch-agent enroll --token`).
    Enrollment,
    /// `dwa_…`: a bearer token for the HTTP API, with a role.
    Api,
}

impl TokenKind {
    /// The prefix including its `_`.
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Enrollment => "dwt_",
            TokenKind::Api => "dwa_",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            TokenKind::Enrollment => "enrollment token",
            TokenKind::Api => "API token",
        }
    }
}

/// A token in its printable form, with its id and stored hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    kind: TokenKind,
    text: String,
}

impl std::fmt::Debug for Token {
    // Never print the secret by accident.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}{}_…)", self.kind.prefix(), self.id())
    }
}

/// A string that is not a token of the expected kind (refused before any database lookup).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed {} (expected {}<8 hex digits>_<43 base64url characters>)",
    kind.noun(),
    kind.prefix()
)]
pub struct MalformedToken {
    pub kind: TokenKind,
}

/// Random bytes could not be had from the OS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

impl Token {
    /// A new random token of `kind`.
    pub fn generate(kind: TokenKind) -> Result<Token, RandomError> {
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; ID_LEN / 2];
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill(&mut id).map_err(|_| RandomError)?;
        rng.fill(&mut secret).map_err(|_| RandomError)?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Token {
            kind,
            text: format!("{}{id}_{}", kind.prefix(), URL_SAFE_NO_PAD.encode(secret)),
        })
    }

    /// Parses a token of `kind` as a client sent it (surrounding whitespace ignored).
    pub fn parse(kind: TokenKind, s: &str) -> Result<Token, MalformedToken> {
        let bad = MalformedToken { kind };
        let s = s.trim();
        let rest = s.strip_prefix(kind.prefix()).ok_or(bad.clone())?;
        let (id, secret) = rest.split_at_checked(ID_LEN).ok_or(bad.clone())?;
        if !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad);
        }
        let secret = secret.strip_prefix('_').ok_or(bad.clone())?;
        match URL_SAFE_NO_PAD.decode(secret) {
            Ok(bytes) if bytes.len() == SECRET_BYTES => Ok(Token {
                kind,
                text: s.to_string(),
            }),
            _ => Err(bad),
        }
    }

    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    /// The public id.
    pub fn id(&self) -> &str {
        let p = self.kind.prefix().len();
        &self.text[p..p + ID_LEN]
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

    /// The row to store for this (enrollment) token.
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

    const KINDS: [TokenKind; 2] = [TokenKind::Enrollment, TokenKind::Api];

    #[test]
    fn generated_tokens_parse_back() {
        for kind in KINDS {
            for _ in 0..50 {
                let t = Token::generate(kind).unwrap();
                assert_eq!(t.reveal().len(), 4 + 8 + 1 + 43);
                assert!(t.reveal().starts_with(kind.prefix()));
                let back = Token::parse(kind, &format!(" {}\n", t.reveal())).unwrap();
                assert_eq!(back, t);
                assert_eq!(back.sha256(), t.sha256());
                assert_eq!(back.id(), &t.reveal()[4..12]);
                assert!(!format!("{t:?}").contains(&t.reveal()[13..]));
            }
        }
    }

    #[test]
    fn one_kind_is_never_the_other() {
        let e = Token::generate(TokenKind::Enrollment).unwrap();
        let a = Token::generate(TokenKind::Api).unwrap();
        assert_eq!(
            Token::parse(TokenKind::Api, e.reveal()),
            Err(MalformedToken {
                kind: TokenKind::Api
            })
        );
        assert!(Token::parse(TokenKind::Enrollment, a.reveal()).is_err());
        let msg = Token::parse(TokenKind::Api, "x").unwrap_err().to_string();
        assert!(
            msg.contains("malformed API token") && msg.contains("dwa_"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for kind in KINDS {
            let p = kind.prefix();
            let good = Token::generate(kind).unwrap().reveal().to_string();
            let secret = &good[13..];
            for bad in [
                "".to_string(),
                p.to_string(),
                good.replacen(p, "dwx_", 1),
                format!("{p}ABCDEF01_{secret}"),
                format!("{p}abcdef0_{secret}"),
                format!("{p}abcdef01{secret}"),
                format!("{p}abcdef01_{}", &secret[1..]),
                format!("{p}abcdef01_{secret}A"),
                format!("{p}abcdef01_{}=", &secret[..42]),
                format!("{p}abcdéf01_{secret}"),
            ] {
                assert_eq!(
                    Token::parse(kind, &bad),
                    Err(MalformedToken { kind }),
                    "{bad:?}"
                );
            }
        }
    }

    #[test]
    fn secret_may_contain_underscores() {
        // base64url uses '_' and '-': the id is found by length, not by splitting.
        let t = format!("dwa_0123abcd_{}", URL_SAFE_NO_PAD.encode([0xff; 32]));
        assert!(t[13..].contains('_'));
        assert_eq!(Token::parse(TokenKind::Api, &t).unwrap().id(), "0123abcd");
    }
}
