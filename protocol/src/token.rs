//! Session tokens: JWTs signed with HS256, checked with the time passed in.
//!
//! A token names a user (`sub`) and one of its devices (`dev`), is meant for
//! Courier (`aud` = [`AUDIENCE`]) and is valid from `nbf` to `exp` (seconds
//! since the Unix epoch). Only HS256 is accepted: the algorithm is pinned, so
//! `alg: none` and every other algorithm are refused before any signature
//! check. jsonwebtoken verifies the signature; this module checks the times
//! against the `now` it is given, so tests can step the clock.

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::is_valid_user_id;

/// The audience every Courier token names.
pub const AUDIENCE: &str = "courier";

/// Leeway allowed on `exp` and `nbf` for clock skew between issuer and node.
pub const LEEWAY_S: u64 = 30;

/// The claims a Courier token carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// The device of the user (1-based; a user may link several).
    pub dev: u32,
    /// Audience; must be [`AUDIENCE`].
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not valid before, seconds since the epoch.
    pub nbf: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
}

/// A shared HS256 signing secret. Its `Debug` shows only its kind.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(HS256)")
    }
}

/// Why a token was refused. Messages name no part of the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is not a well-formed HS256 JWT with a valid signature and
    /// audience (this covers `alg: none` and other algorithms).
    #[error("token is malformed, wrongly signed, or not for this service")]
    Invalid,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is still in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `sub` is not a valid user id or `dev` is zero.
    #[error("token names an invalid user or device")]
    BadSubject,
}

/// Signs `claims` with `secret`.
pub fn mint(secret: &Secret, claims: &Claims) -> String {
    // Encoding our own serde struct with HS256 cannot fail: the only error
    // sources are serialization (plain fields) and key type mismatch (none).
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(&secret.0),
    )
    .unwrap_or_default()
}

/// Claims for `user`'s `device`, valid from `now_s` for `ttl_s` seconds.
pub fn claims_for(user: &str, device: u32, now_s: u64, ttl_s: u64) -> Claims {
    Claims {
        sub: user.to_owned(),
        dev: device,
        aud: AUDIENCE.to_owned(),
        exp: now_s + ttl_s,
        nbf: now_s.saturating_sub(1),
        iat: now_s,
    }
}

/// Verifies `token` and returns its claims if it is valid at `now_s`.
pub fn verify(secret: &Secret, token: &str, now_s: u64) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "nbf", "aud", "sub"]);
    // Times are checked below against the caller's clock, not the system's.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&secret.0), &validation)
            .map_err(|_| TokenError::Invalid)?;
    let claims = data.claims;
    if claims.exp + LEEWAY_S <= now_s {
        return Err(TokenError::Expired);
    }
    if claims.nbf > now_s + LEEWAY_S {
        return Err(TokenError::NotYetValid);
    }
    if !is_valid_user_id(&claims.sub) || claims.dev == 0 {
        return Err(TokenError::BadSubject);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    #[test]
    fn valid_token_round_trips() {
        let claims = claims_for("alice", 2, NOW, 3600);
        let token = mint(&secret(), &claims);
        assert_eq!(verify(&secret(), &token, NOW + 10), Ok(claims));
    }

    #[test]
    fn times_are_checked_against_the_given_clock() {
        let token = mint(&secret(), &claims_for("alice", 1, NOW, 60));
        assert_eq!(
            verify(&secret(), &token, NOW + 60 + LEEWAY_S),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(&secret(), &token, NOW - 10 - LEEWAY_S),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn wrong_secret_and_audience_are_invalid() {
        let token = mint(&secret(), &claims_for("alice", 1, NOW, 60));
        assert_eq!(
            verify(&Secret::new(b"other".to_vec()), &token, NOW),
            Err(TokenError::Invalid)
        );
        let mut claims = claims_for("alice", 1, NOW, 60);
        claims.aud = "someone-else".into();
        assert_eq!(
            verify(&secret(), &mint(&secret(), &claims), NOW),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let claims = claims_for("alice", 1, NOW, 60);
        // An unsigned token: header {"alg":"none"}, the claims, an empty signature.
        let payload = serde_json_like(&claims);
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert_eq!(verify(&secret(), &none, NOW), Err(TokenError::Invalid));
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(&secret().0),
        )
        .unwrap();
        assert_eq!(verify(&secret(), &hs512, NOW), Err(TokenError::Invalid));
    }

    #[test]
    fn bad_subjects_are_refused() {
        let token = mint(&secret(), &claims_for("a:b", 1, NOW, 60));
        assert_eq!(verify(&secret(), &token, NOW), Err(TokenError::BadSubject));
        let token = mint(&secret(), &claims_for("alice", 0, NOW, 60));
        assert_eq!(verify(&secret(), &token, NOW), Err(TokenError::BadSubject));
    }

    #[test]
    fn secret_debug_hides_bytes() {
        assert_eq!(format!("{:?}", secret()), "Secret(HS256)");
    }

    /// The base64url claims segment of a real HS256 token for `claims`.
    fn serde_json_like(claims: &Claims) -> String {
        let token = mint(&secret(), claims);
        token.split('.').nth(1).unwrap_or_default().to_owned()
    }
}
