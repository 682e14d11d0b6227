//! Host ids: the name a host has in the fleet and in its client certificate
//! (`spiffe://driftwatch/host/<host-id>`).
//!
//! Syntax: 1–253 characters of `[A-Za-z0-9._-]`, the first alphanumeric. Hostnames (and fully
//! qualified names) fit; nothing that could escape a URI path segment, a file name or a log
//! line does.

/// Longest host id (a DNS name's limit).
pub const MAX_LEN: usize = 253;

/// Why a string is not a host id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostIdError {
    #[error("host id is empty")]
    Empty,
    #[error("host id is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("host id must start with a letter or digit")]
    BadStart,
    #[error("host id may only contain letters, digits, '.', '_' and '-' (found {0:?})")]
    BadChar(char),
}

/// Checks the host id syntax.
pub fn validate(id: &str) -> Result<(), HostIdError> {
    let first = id.chars().next().ok_or(HostIdError::Empty)?;
    if id.len() > MAX_LEN {
        return Err(HostIdError::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(HostIdError::BadStart);
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(HostIdError::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostnames() {
        for ok in ["web-01", "a", "web01.prod.example.com", "9host", "db_2"] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate(&"a".repeat(MAX_LEN)), Ok(()));
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!(validate(""), Err(HostIdError::Empty));
        assert_eq!(
            validate(&"a".repeat(MAX_LEN + 1)),
            Err(HostIdError::TooLong)
        );
        assert_eq!(validate("-web"), Err(HostIdError::BadStart));
        assert_eq!(validate(".web"), Err(HostIdError::BadStart));
        assert_eq!(validate("web/../x"), Err(HostIdError::BadChar('/')));
        assert_eq!(validate("web 1"), Err(HostIdError::BadChar(' ')));
        assert_eq!(validate("wéb"), Err(HostIdError::BadChar('é')));
        assert_eq!(validate("web\n"), Err(HostIdError::BadChar('\n')));
    }
}
