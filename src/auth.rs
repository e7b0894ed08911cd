//! Authentication: who is connecting, proven by a JWT.
//!
//! Off unless a key is configured: `WSGATE_JWT_SECRET` (HS256) or
//! `WSGATE_JWT_PUBLIC_KEY` (RS256 for an RSA key, ES256 for a P-256 key; PEM).
//! The token comes from `Authorization: Bearer <token>` or, because browsers
//! cannot set headers on a WebSocket, from the `token` query parameter; giving
//! it twice (both, or repeated) is refused, so no two components can disagree
//! about which token counts.
//!
//! [`Verifier::verify`] checks, through the `jsonwebtoken` crate: the
//! signature, with exactly one accepted algorithm that follows from the key
//! (so `alg: none` and HS256-signed-with-the-public-key confusion fail), `exp`
//! (required), `nbf` (when present), `aud` and `iss` when configured (then
//! required), a `sub` string (required: the callback and `refresh` need an
//! identity), no `crit` header (we understand no extension), and no duplicate
//! key anywhere in the claims (an issuer and a verifier that resolve
//! `{"subscribe":[..],"subscribe":[..]}` differently would disagree on the
//! ACL). The `subscribe` claim becomes the connection's [`Acl`], and the
//! `publish` claim (same form) the list of channels it may publish to
//! (`docs/protocol.md`, "Publish").
//!
//! Also here: [`secrets_equal`], the constant-time comparison used for
//! `WSGATE_API_KEY`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use warp::http::{header, HeaderMap};

use crate::acl::Acl;

/// Shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key at least as
/// long as the hash (32 bytes); a shorter one can be brute-forced offline from
/// any token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The key tokens are verified with, and so the one algorithm accepted.
#[derive(Clone)]
pub struct JwtKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

impl fmt::Debug for JwtKey {
    /// Never prints key material (the secret is a credential).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey({:?}, [redacted])", self.algorithm)
    }
}

impl JwtKey {
    /// An HS256 secret, used as its UTF-8 bytes.
    pub fn secret(secret: &str) -> Result<JwtKey, &'static str> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err("a secret of at least 32 bytes");
        }
        Ok(JwtKey {
            key: DecodingKey::from_secret(secret.as_bytes()),
            algorithm: Algorithm::HS256,
        })
    }

    /// A PEM public key: RSA (→ RS256) or P-256 EC (→ ES256). The key is
    /// parsed for real here, so a bad one stops start-up instead of failing
    /// every connection.
    pub fn public_pem(pem: &[u8]) -> Result<JwtKey, &'static str> {
        const ACCEPTED: &str = "a PEM public key (RSA for RS256, or P-256 EC for ES256), or the path of a file holding one";
        let candidates = [
            (DecodingKey::from_rsa_pem(pem), Algorithm::RS256),
            (DecodingKey::from_ec_pem(pem), Algorithm::ES256),
        ];
        for (key, algorithm) in candidates {
            let Ok(key) = key else { continue };
            // Building a verifier parses the key (DER, curve); a signature
            // mismatch answers Ok(false), a bad key an error.
            if jsonwebtoken::crypto::verify("AA", b"probe", &key, algorithm).is_ok() {
                return Ok(JwtKey { key, algorithm });
            }
        }
        Err(ACCEPTED)
    }

    /// The only algorithm a token may use with this key.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// Why a token (or the lack of one) is refused. The message is what the
/// client is told: short, and never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the header or the query.
    #[error("missing token")]
    Missing,
    /// A token in both places, or the parameter or header repeated.
    #[error("token given more than once")]
    Ambiguous,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("Authorization header must be: Bearer <token>")]
    Scheme,
    /// Not a JWT, bad base64 or JSON, or an unknown algorithm (`none`).
    #[error("invalid token: malformed")]
    Malformed,
    /// A valid algorithm, but not the one the configured key is for.
    #[error("invalid token: algorithm not accepted")]
    Algorithm,
    /// The signature does not verify with the configured key.
    #[error("invalid token: bad signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is still in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` does not name this gateway (or is missing).
    #[error("invalid token: wrong audience")]
    Audience,
    /// `iss` is not the configured issuer (or is missing).
    #[error("invalid token: wrong issuer")]
    Issuer,
    /// A required claim is absent or not of the right type.
    #[error("invalid token: missing or invalid claim {0}")]
    Claim(&'static str),
    /// Duplicate keys in the claims.
    #[error("invalid token: duplicate claim")]
    Duplicate,
    /// A `crit` header: extensions we do not implement must be refused.
    #[error("invalid token: unsupported critical header")]
    Critical,
}

/// A verified token: who, what they may subscribe to and publish to, until when.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The `sub` claim.
    pub subject: String,
    /// Every claim, as verified (sent to the authorisation callback).
    pub claims: Map<String, Value>,
    /// The `subscribe` claim; nothing when absent.
    pub acl: Acl,
    /// The `publish` claim: the channels this token may publish to over its
    /// socket (on top of `WSGATE_CLIENT_PUBLISH`, which must allow them too).
    /// Nothing when absent, so a token issued before client publishing
    /// existed never gains the right.
    pub publish_acl: Acl,
    /// The `call` claim: the `service:method` globs this token may call
    /// (beside `WSGATE_CALL_ALLOW`, which allows them for everyone).
    /// Nothing when absent.
    pub call_acl: Acl,
    /// The `services` claim: the service names this token may register on
    /// `WSGATE_SERVICES_PATH` (globs). Nothing when absent.
    pub services_acl: Acl,
    /// When the token stops being valid: `exp` plus the configured leeway.
    pub expires_at: SystemTime,
}

impl Identity {
    /// The identity that verified `claims` prove, valid until `expires_at`
    /// (`exp` plus the leeway): `sub` and the `subscribe` ACL are read from
    /// them. [`Verifier::verify`] builds every identity through this, and so
    /// does a node that adopts a Bayeux session from the handoff store
    /// (`crate::handoff::Record`), whose claims another node verified: both
    /// then hold the same identity.
    pub fn from_claims(
        claims: Map<String, Value>,
        expires_at: SystemTime,
    ) -> Result<Identity, AuthError> {
        let subject = match claims.get("sub") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(AuthError::Claim("sub")),
        };
        let acl = claim_acl(&claims, "subscribe")?;
        let publish_acl = claim_acl(&claims, "publish")?;
        let call_acl = claim_acl(&claims, "call")?;
        let services_acl = claim_acl(&claims, "services")?;
        Ok(Identity {
            subject,
            claims,
            acl,
            publish_acl,
            call_acl,
            services_acl,
            expires_at,
        })
    }

    /// Time left before the token expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

/// Verifies tokens against the configured key and claims.
#[derive(Debug, Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
}

impl Verifier {
    /// A verifier for `key`; `audiences` and `issuers`, when non-empty, must
    /// be matched by the token (which must then carry the claim).
    pub fn new(key: &JwtKey, audiences: &[String], issuers: &[String], leeway: Duration) -> Self {
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if audiences.is_empty() {
            // A token naming an audience is still usable here when none is
            // configured: the operator chose not to check it.
            validation.validate_aud = false;
        } else {
            validation.set_audience(audiences);
            required.push("aud");
        }
        if !issuers.is_empty() {
            validation.set_issuer(issuers);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Verifier {
            key: key.key.clone(),
            validation,
            leeway: Duration::from_secs(leeway.as_secs()),
        }
    }

    /// Checks `token` and returns the identity it proves.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<StrictClaims>(token, &self.key, &self.validation)
            .map_err(|e| map_error(e.kind()))?;
        if data.header.crit.is_some() {
            return Err(AuthError::Critical);
        }
        let claims = data.claims.0;
        let exp = match claims.get("exp") {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f.round() as u64)),
            _ => None,
        }
        .ok_or(AuthError::Claim("exp"))?;
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .and_then(|t| t.checked_add(self.leeway))
            .ok_or(AuthError::Claim("exp"))?;
        let identity = Identity::from_claims(claims, expires_at)?;
        // The library accepts `exp == now`; a token with no time left would
        // be closed at once, so it is refused here instead.
        if identity.remaining().is_zero() {
            return Err(AuthError::Expired);
        }
        Ok(identity)
    }
}

/// An ACL claim (`subscribe`, `publish`): an array of strings, each an entry
/// of [`Acl`]; absent means nothing is allowed. Any other shape refuses the
/// token rather than guessing what the issuer meant.
fn claim_acl(claims: &Map<String, Value>, name: &'static str) -> Result<Acl, AuthError> {
    match claims.get(name) {
        None => Ok(Acl::nothing()),
        Some(Value::Array(items)) => {
            let mut entries = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => entries.push(s.as_bytes()),
                    _ => return Err(AuthError::Claim(name)),
                }
            }
            Ok(Acl::new(entries))
        }
        Some(_) => Err(AuthError::Claim(name)),
    }
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::Algorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => match c.as_str() {
            "aud" => AuthError::Audience,
            "iss" => AuthError::Issuer,
            "exp" => AuthError::Claim("exp"),
            "nbf" => AuthError::Claim("nbf"),
            _ => AuthError::Claim("sub"),
        },
        ErrorKind::Json(e) if e.to_string().contains(DUPLICATE) => AuthError::Duplicate,
        _ => AuthError::Malformed,
    }
}

/// The token of an upgrade request: from `Authorization: Bearer`, or from the
/// `token` query parameter (percent-decoded); never from both.
pub fn request_token(headers: &HeaderMap, query: &str) -> Result<String, AuthError> {
    let from_header = bearer(headers)?;
    let mut from_query = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key).as_deref() != Some("token") {
            continue;
        }
        if from_query.is_some() {
            return Err(AuthError::Ambiguous);
        }
        from_query = Some(percent_decode(value).ok_or(AuthError::Malformed)?);
    }
    match (from_header, from_query) {
        (Some(_), Some(_)) => Err(AuthError::Ambiguous),
        (Some(t), None) | (None, Some(t)) if !t.is_empty() => Ok(t),
        _ => Err(AuthError::Missing),
    }
}

/// The credential of an `Authorization: Bearer <credential>` header, if the
/// request has one; a repeated header or another scheme is an error.
pub fn bearer(headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::Ambiguous);
    }
    let value = value.to_str().map_err(|_| AuthError::Scheme)?;
    match value.trim().split_once(' ') {
        Some((scheme, credential))
            if scheme.eq_ignore_ascii_case("bearer") && !credential.trim().is_empty() =>
        {
            Ok(Some(credential.trim().to_owned()))
        }
        _ => Err(AuthError::Scheme),
    }
}

/// Decodes `%XX` escapes and `+` (form encoding); `None` on a broken escape
/// or a result that is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Compares two secrets in time that depends only on their lengths, never
/// on where they differ, so response timing cannot be used to guess a key
/// byte by byte.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    let len = given.len().max(expected.len());
    let mut diff = u8::from(given.len() != expected.len());
    for i in 0..len {
        let a = given.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        diff |= a ^ b;
    }
    // Keep the optimiser from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

/// Marker in the error serde reports for a repeated key.
const DUPLICATE: &str = "duplicate claim";

/// The claims object, read so that a key given twice, at any depth, is an
/// error instead of "last one wins".
struct StrictClaims(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictClaims {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrictValue::deserialize(d)?.0 {
            Value::Object(map) => Ok(StrictClaims(map)),
            _ => Err(de::Error::custom("claims must be a JSON object")),
        }
    }
}

/// A JSON value whose objects have no repeated keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(StrictValue(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(value) = map.next_value()?;
            if out.insert(key, value).is_some() {
                return Err(de::Error::custom(DUPLICATE));
            }
        }
        Ok(StrictValue(Value::Object(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn verifier() -> Verifier {
        Verifier::new(&JwtKey::secret(SECRET).unwrap(), &[], &[], Duration::ZERO)
    }

    fn sign(claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    /// Signs an arbitrary payload text (to send JSON serde would not produce).
    fn sign_raw(payload: &str) -> String {
        use base64::Engine as _;
        let b64 = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let message = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(payload.as_bytes())
        );
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{message}.{sig}")
    }

    #[test]
    fn verifies_a_good_token() {
        let exp = now() + 100;
        let t = sign(&json!({"sub":"u1","exp":exp,"subscribe":["news.*"]}));
        let id = verifier().verify(&t).unwrap();
        assert_eq!(id.subject, "u1");
        assert_eq!(id.acl, Acl::new(["news.*"]));
        assert_eq!(id.publish_acl, Acl::nothing(), "no publish claim: nothing");
        assert_eq!(id.expires_at, UNIX_EPOCH + Duration::from_secs(exp));
        assert!(id.remaining() > Duration::from_secs(90));
    }

    #[test]
    fn refuses_bad_tokens() {
        let v = verifier();
        let exp = now() + 100;
        for (token, want) in [
            (
                sign(&json!({"sub":"u","exp":now() - 1})),
                AuthError::Expired,
            ),
            (sign(&json!({"sub":"u"})), AuthError::Claim("exp")),
            (sign(&json!({"exp":exp})), AuthError::Claim("sub")),
            (sign(&json!({"sub":5,"exp":exp})), AuthError::Claim("sub")),
            (
                sign(&json!({"sub":"u","exp":"soon"})),
                AuthError::Claim("exp"),
            ),
            (
                sign(&json!({"sub":"u","exp":exp,"nbf":now() + 100})),
                AuthError::NotYetValid,
            ),
            (
                sign(&json!({"sub":"u","exp":exp,"subscribe":"*"})),
                AuthError::Claim("subscribe"),
            ),
            (
                sign(&json!({"sub":"u","exp":exp,"subscribe":["a", 1]})),
                AuthError::Claim("subscribe"),
            ),
            (
                sign(&json!({"sub":"u","exp":exp,"publish":"chat.*"})),
                AuthError::Claim("publish"),
            ),
            (
                sign(&json!({"sub":"u","exp":exp,"publish":[null]})),
                AuthError::Claim("publish"),
            ),
            (
                sign_raw(&format!(
                    r#"{{"sub":"u","exp":{exp},"publish":["a"],"publish":["*"]}}"#
                )),
                AuthError::Duplicate,
            ),
            (
                sign_raw(&format!(
                    r#"{{"sub":"u","exp":{exp},"subscribe":["a"],"subscribe":["*"]}}"#
                )),
                AuthError::Duplicate,
            ),
            (
                sign_raw(&format!(r#"{{"sub":"u","exp":{exp},"x":{{"k":1,"k":2}}}}"#)),
                AuthError::Duplicate,
            ),
            (sign_raw("[1]"), AuthError::Malformed),
            ("abc".to_owned(), AuthError::Malformed),
            ("a.b.c".to_owned(), AuthError::Malformed),
        ] {
            assert_eq!(v.verify(&token).unwrap_err(), want, "{token}");
        }
        // Signed with another secret.
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"u","exp":exp}),
            &EncodingKey::from_secret(b"another secret, 32 bytes or more!!"),
        )
        .unwrap();
        assert_eq!(v.verify(&other).unwrap_err(), AuthError::Signature);
        // Another HMAC algorithm with the right secret.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"sub":"u","exp":exp}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&hs512).unwrap_err(), AuthError::Algorithm);
    }

    #[test]
    fn the_publish_claim_is_its_own_acl() {
        let t = sign(&json!({
            "sub":"u","exp":now() + 100,"subscribe":["news.*"],"publish":["chat.*","alerts"]
        }));
        let id = verifier().verify(&t).unwrap();
        assert_eq!(id.publish_acl, Acl::new(["chat.*", "alerts"]));
        assert_eq!(id.acl, Acl::new(["news.*"]), "subscribe is not widened");
    }

    #[test]
    fn audience_and_issuer_are_required_when_configured() {
        let key = JwtKey::secret(SECRET).unwrap();
        let v = Verifier::new(&key, &["gw".into()], &["idp".into()], Duration::ZERO);
        let exp = now() + 100;
        let ok = sign(&json!({"sub":"u","exp":exp,"aud":"gw","iss":"idp"}));
        assert!(v.verify(&ok).is_ok());
        let list = sign(&json!({"sub":"u","exp":exp,"aud":["x","gw"],"iss":"idp"}));
        assert!(v.verify(&list).is_ok());
        for (claims, want) in [
            (
                json!({"sub":"u","exp":exp,"iss":"idp"}),
                AuthError::Audience,
            ),
            (
                json!({"sub":"u","exp":exp,"aud":"other","iss":"idp"}),
                AuthError::Audience,
            ),
            (json!({"sub":"u","exp":exp,"aud":"gw"}), AuthError::Issuer),
            (
                json!({"sub":"u","exp":exp,"aud":"gw","iss":"evil"}),
                AuthError::Issuer,
            ),
        ] {
            assert_eq!(v.verify(&sign(&claims)).unwrap_err(), want, "{claims}");
        }
        // Not configured: an `aud` in the token is not held against it.
        assert!(verifier().verify(&ok).is_ok());
    }

    #[test]
    fn far_future_expiry_does_not_overflow() {
        for exp in [json!(u64::MAX), json!(1e300), json!(9_999_999_999_999u64)] {
            let t = sign(&json!({"sub":"u","exp":exp}));
            // Refused or accepted, never a panic.
            if let Ok(id) = verifier().verify(&t) {
                assert!(id.remaining() > Duration::from_secs(1));
            }
        }
    }

    #[test]
    fn leeway_extends_expiry() {
        let key = JwtKey::secret(SECRET).unwrap();
        let v = Verifier::new(&key, &[], &[], Duration::from_secs(30));
        let t = sign(&json!({"sub":"u","exp":now() - 5}));
        let id = v.verify(&t).unwrap();
        assert!(id.remaining() > Duration::from_secs(20));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(JwtKey::secret("short").is_err());
        assert!(JwtKey::public_pem(b"not a key").is_err());
    }

    #[test]
    fn finds_the_token_in_header_or_query() {
        let mut h = HeaderMap::new();
        assert_eq!(request_token(&h, ""), Err(AuthError::Missing));
        assert_eq!(request_token(&h, "a=1&token=abc"), Ok("abc".into()));
        assert_eq!(request_token(&h, "token=a%2Eb"), Ok("a.b".into()));
        assert_eq!(request_token(&h, "tok%65n=x"), Ok("x".into()));
        assert_eq!(request_token(&h, "token="), Err(AuthError::Missing));
        assert_eq!(request_token(&h, "token=%zz"), Err(AuthError::Malformed));
        assert_eq!(request_token(&h, "token=%ff"), Err(AuthError::Malformed));
        assert_eq!(
            request_token(&h, "token=a&token=b"),
            Err(AuthError::Ambiguous)
        );
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(request_token(&h, ""), Ok("abc".into()));
        assert_eq!(request_token(&h, "token=x"), Err(AuthError::Ambiguous));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(request_token(&h, ""), Ok("abc".into()));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(request_token(&h, ""), Err(AuthError::Scheme));
        h.insert(header::AUTHORIZATION, "Bearer".parse().unwrap());
        assert_eq!(request_token(&h, ""), Err(AuthError::Scheme));
        h.insert(header::AUTHORIZATION, "Bearer a".parse().unwrap());
        h.append(header::AUTHORIZATION, "Bearer b".parse().unwrap());
        assert_eq!(request_token(&h, ""), Err(AuthError::Ambiguous));
    }

    #[test]
    fn compares_secrets() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(!secrets_equal(b"", b"a"));
        assert!(!secrets_equal(b"abc\0", b"abc"));
        assert!(secrets_equal(b"", b""));
    }
}
