//! Signed per-user tokens: JSON Web Tokens (RFC 7519) signed with HMAC-SHA256, as
//! Cheshire Cat 1.7+ issues them. Only `HS256` is accepted: `alg: none`, the RSA and EC
//! algorithms (whose confusion with HMAC is the classic JWT forgery) and anything else are
//! refused before the signature is looked at. The HMAC is `ring`'s, checked in constant time.
//! Pure functions: the time is passed in.

use crate::protocol::UserId;
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ring::hmac;
use serde_json::{Map, Value};
use std::fmt;

/// Longest token looked at; a token with a user id and three times is about 200 bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Seconds a token may be past its `exp` or before its `nbf`: a kiosk's clock can be off by
/// that much before NTP has set it (a Pi has no clock of its own).
pub const LEEWAY_SECS: u64 = 60;

/// RFC 7515 §2: base64url without padding; padding is tolerated, as some encoders add it.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a token was refused: the reason goes in the log and the 403, never the token.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON, or larger than [`MAX_TOKEN_BYTES`].
    Malformed(&'static str),
    /// The header names another algorithm than HS256 (`none` included).
    Algorithm(String),
    /// The signature does not match: forged, or signed with another secret.
    Signature,
    /// No `exp` claim: a token that never expires is refused.
    NoExpiry,
    /// Past its `exp` (plus the leeway).
    Expired,
    /// Before its `nbf` (minus the leeway).
    NotYetValid,
    /// No `sub` (nor Cheshire Cat's `username`), or one that is not a valid user id.
    User,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "malformed token: {why}"),
            TokenError::Algorithm(alg) => {
                write!(
                    f,
                    "token algorithm {alg:?} refused (only HS256 is accepted)"
                )
            }
            TokenError::Signature => f.write_str("token signature does not match"),
            TokenError::NoExpiry => f.write_str("token has no exp claim"),
            TokenError::Expired => f.write_str("token expired"),
            TokenError::NotYetValid => f.write_str("token not valid yet (nbf)"),
            TokenError::User => f.write_str("token names no valid user (sub)"),
        }
    }
}

/// The secret of `--jwt-secret`, ready to sign and verify.
#[derive(Clone)]
pub struct Secret(hmac::Key);

impl Secret {
    /// The key for `secret`'s bytes.
    pub fn new(secret: &str) -> Secret {
        Secret(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Checks `token` against `secret` at Unix time `now`; the user it was issued to.
pub fn verify(token: &str, secret: &Secret, now: u64) -> Result<UserId, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three parts"));
    };
    // The algorithm first: nothing else of a token with another one is trusted.
    let head = json_part(header)?;
    match head.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        Some(Value::String(alg)) => return Err(TokenError::Algorithm(alg.clone())),
        _ => return Err(TokenError::Malformed("header has no alg")),
    }
    // RFC 7515 §4.1.11: extensions we do not know must be refused.
    if head.contains_key("crit") {
        return Err(TokenError::Malformed(
            "critical header extensions not supported",
        ));
    }
    let signature = B64
        .decode(signature)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    let signed = &token[..header.len() + 1 + payload.len()];
    hmac::verify(&secret.0, signed.as_bytes(), &signature).map_err(|_| TokenError::Signature)?;
    let claims = json_part(payload)?;
    let exp = time_claim(&claims, "exp")?.ok_or(TokenError::NoExpiry)?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = time_claim(&claims, "nbf")?
        && now.saturating_add(LEEWAY_SECS) < nbf
    {
        return Err(TokenError::NotYetValid);
    }
    let user = match (claims.get("sub"), claims.get("username")) {
        (Some(Value::String(u)), _) | (None, Some(Value::String(u))) => u,
        _ => return Err(TokenError::User),
    };
    UserId::parse(user).ok_or(TokenError::User)
}

/// A token for `user`, valid from `now` for `ttl_secs` (`straycat token`).
pub fn sign(user: &UserId, secret: &Secret, now: u64, ttl_secs: u64) -> String {
    let claims = serde_json::json!({
        "sub": user.as_str(),
        "username": user.as_str(),
        "iat": now,
        "exp": now.saturating_add(ttl_secs),
    });
    sign_parts(
        br#"{"alg":"HS256","typ":"JWT"}"#,
        claims.to_string().as_bytes(),
        secret,
    )
}

/// A token of these header and claims bytes, whatever they hold, signed with `secret`:
/// [`sign`]'s, and the tests' and fuzz targets' hand-made ones.
pub(crate) fn sign_parts(header: &[u8], claims: &[u8], secret: &Secret) -> String {
    let signed = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let tag = hmac::sign(&secret.0, signed.as_bytes());
    format!("{signed}.{}", B64.encode(tag.as_ref()))
}

/// A base64url part holding a JSON object.
fn json_part(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = B64
        .decode(part)
        .map_err(|_| TokenError::Malformed("part is not base64url"))?;
    // From a str, as every other JSON the server reads: one parser in the binary, not two.
    let text = String::from_utf8(bytes).map_err(|_| TokenError::Malformed("part is not UTF-8"))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed("part is not a JSON object")),
    }
}

/// A NumericDate claim (RFC 7519 §2: seconds, possibly fractional); negative reads as 0.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(secs), _) => Ok(Some(secs)),
            // `as` saturates: a huge or negative float is far future or the epoch.
            (None, Some(secs)) => Ok(Some(secs as u64)),
            (None, None) => Err(TokenError::Malformed("time claim is not a number")),
        },
        Some(_) => Err(TokenError::Malformed("time claim is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn secret() -> Secret {
        Secret::new("a kiosk secret of enough length!")
    }

    fn user(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    /// A token with these header and claims, signed with `secret`.
    fn forge(header: &str, claims: &str, secret: &Secret) -> String {
        sign_parts(header.as_bytes(), claims.as_bytes(), secret)
    }

    #[test]
    fn a_signed_token_names_its_user_until_it_expires() {
        let t = sign(&user("kiosk-1"), &secret(), NOW, 3600);
        assert_eq!(verify(&t, &secret(), NOW), Ok(user("kiosk-1")));
        assert_eq!(
            verify(&t, &secret(), NOW + 3600 + LEEWAY_SECS),
            Ok(user("kiosk-1"))
        );
        assert_eq!(
            verify(&t, &secret(), NOW + 3601 + LEEWAY_SECS),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(&t, &Secret::new("another secret"), NOW),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn the_cats_own_tokens_are_accepted() {
        // As Cheshire Cat 1.7 signs them (PyJWT): its claims, a float exp.
        let claims = r#"{"sub":"8f9a2c1e-0b1d-4c55-9f00-1c2d3e4f5a6b","username":"alice","permissions":{"CONVERSATION":["READ","WRITE"]},"exp":1800000100.5}"#;
        let t = forge(r#"{"alg":"HS256","typ":"JWT"}"#, claims, &secret());
        assert_eq!(
            verify(&t, &secret(), NOW),
            Ok(user("8f9a2c1e-0b1d-4c55-9f00-1c2d3e4f5a6b"))
        );
        let t = forge(
            r#"{"alg":"HS256"}"#,
            r#"{"username":"alice","exp":1800000100}"#,
            &secret(),
        );
        assert_eq!(verify(&t, &secret(), NOW), Ok(user("alice")));
    }

    #[test]
    fn other_algorithms_and_bad_claims_are_refused() {
        let s = secret();
        let claims = r#"{"sub":"bob","exp":1800000100}"#;
        for alg in ["none", "HS384", "RS256", "hs256"] {
            let t = forge(&format!(r#"{{"alg":"{alg}"}}"#), claims, &s);
            assert_eq!(verify(&t, &s, NOW), Err(TokenError::Algorithm(alg.into())));
        }
        // `alg: none` with an empty signature, the classic forgery.
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none"}"#),
            B64.encode(claims)
        );
        assert!(matches!(
            verify(&none, &s, NOW),
            Err(TokenError::Algorithm(_))
        ));
        let hs = r#"{"alg":"HS256"}"#;
        assert_eq!(
            verify(&forge(hs, r#"{"sub":"bob"}"#, &s), &s, NOW),
            Err(TokenError::NoExpiry)
        );
        assert_eq!(
            verify(&forge(hs, r#"{"sub":"bob","exp":"soon"}"#, &s), &s, NOW),
            Err(TokenError::Malformed("time claim is not a number"))
        );
        assert_eq!(
            verify(
                &forge(hs, r#"{"sub":"bo b","exp":1800000100}"#, &s),
                &s,
                NOW
            ),
            Err(TokenError::User)
        );
        assert_eq!(
            verify(&forge(hs, r#"{"exp":1800000100}"#, &s), &s, NOW),
            Err(TokenError::User)
        );
        let later = r#"{"sub":"bob","exp":1800009999,"nbf":1800000100}"#;
        assert_eq!(
            verify(&forge(hs, later, &s), &s, NOW),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(verify(&forge(hs, later, &s), &s, NOW + 41), Ok(user("bob")));
        let crit = r#"{"alg":"HS256","crit":["exp"]}"#;
        assert!(matches!(
            verify(&forge(crit, claims, &s), &s, NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn a_tampered_token_is_refused() {
        let s = secret();
        let t = sign(&user("bob"), &s, NOW, 60);
        let (signed, tag) = t.rsplit_once('.').unwrap();
        let (header, _) = signed.split_once('.').unwrap();
        let claims = B64.encode(r#"{"sub":"admin","exp":1900000000}"#);
        let swapped = format!("{header}.{claims}.{tag}");
        assert_eq!(verify(&swapped, &s, NOW), Err(TokenError::Signature));
        for bad in ["", "a", "a.b", "a.b.c.d", "!!.!!.!!", &"x".repeat(5000)] {
            assert!(
                matches!(verify(bad, &s, NOW), Err(TokenError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
