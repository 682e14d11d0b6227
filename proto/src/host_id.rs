//! Host ids: the name a host is known by, from its enrollment on. The collector CA writes it into
//! the client certificate (URI SAN `spiffe://driftwatch/host/<host-id>`, CN), so both ends must
//! agree on what a valid one is.
//!
//! Syntax: 1–253 characters of `[A-Za-z0-9._-]`, the first alphanumeric. That covers every
//! hostname and FQDN, and keeps the id safe inside a URI, a file name, a log line and a glob.

/// Longest host id (the longest DNS name).
pub const MAX_LEN: usize = 253;

/// The URI SAN prefix of client certificates; the host id follows it.
pub const SPIFFE_PREFIX: &str = "spiffe://driftwatch/host/";

/// Why a string is not a host id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostIdError {
    #[error("host id is empty")]
    Empty,
    #[error("host id is {0} characters long; at most {MAX_LEN} are allowed")]
    TooLong(usize),
    #[error("host id must start with a letter or digit")]
    BadFirst,
    #[error("host id may only contain letters, digits, '.', '_' and '-' (found {0:?})")]
    BadChar(char),
}

/// Checks the host id syntax.
pub fn validate(id: &str) -> Result<(), HostIdError> {
    let first = id.chars().next().ok_or(HostIdError::Empty)?;
    if id.len() > MAX_LEN {
        return Err(HostIdError::TooLong(id.len()));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(HostIdError::BadFirst);
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(HostIdError::BadChar(c)),
        None => Ok(()),
    }
}

/// The certificate URI SAN naming `id`.
pub fn to_uri(id: &str) -> String {
    format!("{SPIFFE_PREFIX}{id}")
}

/// The host id a certificate URI SAN names, if it is one of ours and the id is valid.
pub fn from_uri(uri: &str) -> Option<&str> {
    let id = uri.strip_prefix(SPIFFE_PREFIX)?;
    validate(id).ok().map(|()| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostnames_and_fqdns() {
        for ok in [
            "a",
            "web-01",
            "web-01.prod.example.com",
            "9x_y",
            &"a".repeat(253),
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!(validate(""), Err(HostIdError::Empty));
        assert_eq!(validate(&"a".repeat(254)), Err(HostIdError::TooLong(254)));
        assert_eq!(validate("-web"), Err(HostIdError::BadFirst));
        assert_eq!(validate(".web"), Err(HostIdError::BadFirst));
        assert_eq!(validate("web/01"), Err(HostIdError::BadChar('/')));
        assert_eq!(validate("web 01"), Err(HostIdError::BadChar(' ')));
        assert_eq!(validate("wéb"), Err(HostIdError::BadChar('é')));
        assert_eq!(validate("a*"), Err(HostIdError::BadChar('*')));
    }

    #[test]
    fn uri_round_trip() {
        assert_eq!(to_uri("web-01"), "spiffe://driftwatch/host/web-01");
        assert_eq!(from_uri("spiffe://driftwatch/host/web-01"), Some("web-01"));
        assert_eq!(from_uri("spiffe://driftwatch/host/"), None);
        assert_eq!(from_uri("spiffe://driftwatch/host/a/b"), None);
        assert_eq!(from_uri("spiffe://other/host/web-01"), None);
    }
}
