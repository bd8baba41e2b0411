//! API users and their bearer tokens.
//!
//! A token is 32 random bytes, hex-encoded behind a `pcw_` prefix (so a leaked one is easy to
//! grep for). Only its SHA-256 is stored (`users.token_hash`): a copy of the database does not
//! hand out tokens. An unsalted fast hash is enough here because the token is random and long;
//! there is nothing to brute-force, and the hash doubles as the lookup key.

use sha2::Digest;

use crate::store::{Store, StoreError, UserRecord};

/// Why a request could not be authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing `Authorization: Bearer <token>` header")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    #[error("invalid or revoked token")]
    Invalid,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AuthError {
    /// Only a database hiccup is worth retrying; a bad or missing token stays bad.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AuthError::Store(e) if e.is_retryable())
    }
}

/// A new random token.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("pcw_{}", hex::encode(bytes))
}

/// What `users.token_hash` holds for `token`.
pub fn hash_token(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// User names become ledger and job owners and appear in logs: 1-64 of `[A-Za-z0-9_.@-]`.
pub fn check_user_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "user name `{name}` must be 1-64 characters of [A-Za-z0-9_.@-]"
        ))
    }
}

/// Adds a user with a fresh token and, if `credits > 0`, a sign-up grant. Returns the user
/// and the token, which is shown once and never stored.
pub async fn add_user(
    store: &Store,
    name: &str,
    is_admin: bool,
    credits: i64,
) -> Result<(UserRecord, String), StoreError> {
    check_user_name(name).map_err(StoreError::invalid)?;
    if credits < 0 {
        return Err(StoreError::invalid("--credits must be >= 0"));
    }
    let token = new_token();
    let user = store
        .create_user(name, &hash_token(&token), is_admin)
        .await?;
    if credits > 0 {
        store
            .grant(name, credits, "sign-up credits", &format!("signup:{name}"))
            .await?;
    }
    Ok((user, token))
}

/// The user a request's `Authorization` header value names.
pub async fn authenticate(store: &Store, header: Option<&str>) -> Result<UserRecord, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    store
        .user_by_token_hash(&hash_token(token))
        .await?
        .ok_or(AuthError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("pcw_") && a.len() == 68);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
        assert_eq!(hash_token(&a).len(), 64);
        assert!(!hash_token(&a).contains(&a[4..]));
    }

    #[test]
    fn user_names_are_checked() {
        assert!(check_user_name("alice.b@x-1").is_ok());
        assert!(check_user_name("").is_err());
        assert!(check_user_name("a b").is_err());
        assert!(check_user_name(&"x".repeat(65)).is_err());
    }
}
