//! Auth tokens, as etcd 3.5's `server/auth/simple_token.go` and `jwt.go` make them
//! (`--auth-token`, `--auth-token-ttl`).
//!
//! * `simple` (the default): `<16 random letters>.<raft index>`. The letters are drawn by the
//!   member that checked the password; every member assigns the token to the user as it
//!   applies the Authenticate entry at that index, so a token works on every member once it
//!   has applied that entry (a member that has not waits for it, as etcd's
//!   `isValidSimpleToken`). A token expires `--auth-token-ttl` seconds (default 300) after
//!   its last use; tokens are member-local and do not survive a restart, nor AuthDisable, nor
//!   a change of the user's password or the user's deletion.
//! * `jwt,pub-key=<path>,priv-key=<path>,sign-method=<alg>[,ttl=<duration>]`: a signed JWT
//!   with etcd's claims (`username`, `revision`, `exp`), valid on any member holding the
//!   public key until `ttl` (default 5m) passes. Methods: RS256/384/512, PS256/384/512,
//!   ES256/384, EdDSA, and HS256/384/512 (the `priv-key` file is then the shared secret).
//!   A token made before a change of the auth store fails with "revision of auth store is
//!   old" (its `revision` claim is older); clients then authenticate again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;

/// Default JWT lifetime (etcd `jwt.go`: 5 minutes).
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

/// A JWT signer/verifier.
pub struct Jwt {
    alg: Algorithm,
    sign: Option<EncodingKey>,
    verify: DecodingKey,
    ttl: Duration,
}

/// This member's token provider.
pub enum Tokens {
    /// Simple tokens: token -> (user, expiry); entries expire `ttl` after their last use.
    Simple {
        /// Live tokens.
        live: Mutex<HashMap<String, (String, Instant)>>,
        /// Idle lifetime.
        ttl: Duration,
    },
    /// JWT.
    Jwt(Box<Jwt>),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// Parses a Go duration such as `5m`, `30s`, `1h30m`, `500ms`.
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::from_secs_f64(n * secs);
    }
    Some(total)
}

/// Why `--auth-token` cannot be used ([`Tokens::from_flag`]) or a JWT cannot be signed
/// ([`Tokens::sign`]).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// An option without `=`.
    #[error("malformed --auth-token option {0:?}")]
    MalformedOption(String),
    /// `jwt` without `sign-method=`.
    #[error("--auth-token jwt needs sign-method")]
    NoSignMethod,
    /// A `sign-method` jsonwebtoken does not know.
    #[error("invalid sign-method {0:?}")]
    InvalidSignMethod(String),
    /// A `ttl` that is not a Go duration.
    #[error("invalid jwt ttl {0:?}")]
    InvalidTtl(String),
    /// A key file that cannot be read: the option (`priv-key`, `pub-key`), the path, why.
    #[error("cannot read jwt {option} file {path}: {error}")]
    ReadKey {
        /// The option naming the file.
        option: String,
        /// The file.
        path: String,
        /// Why it cannot be read.
        error: std::io::Error,
    },
    /// A sign method that needs a key option (`priv-key` or `pub-key`) given without it.
    #[error("jwt {method} needs {option}")]
    MissingKey {
        /// The sign method.
        method: String,
        /// The missing option.
        option: &'static str,
    },
    /// A malformed key, or signing failed (jsonwebtoken's error and its causes).
    #[error(transparent)]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// An option `jwt` does not take.
    #[error("unknown --auth-token jwt option {0:?}")]
    UnknownOption(String),
    /// A token type other than `simple` or `jwt`.
    #[error("unknown --auth-token type {0:?} (simple or jwt)")]
    UnknownType(String),
    /// [`Tokens::sign`] on simple tokens.
    #[error("not a JWT provider")]
    NotJwt,
    /// [`Tokens::sign`] on a member given only the public key.
    #[error("no jwt priv-key: this member cannot sign tokens")]
    NoPrivateKey,
}

impl Tokens {
    /// The provider `--auth-token` names; `ttl` is `--auth-token-ttl` (simple tokens).
    ///
    /// Errors: an unknown type, a JWT option missing or unknown, an unreadable or malformed
    /// key file.
    pub fn from_flag(spec: &str, ttl: Duration) -> Result<Tokens, TokenError> {
        let mut parts = spec.split(',');
        match parts.next().unwrap_or("") {
            "" | "simple" => Ok(Tokens::Simple {
                live: Mutex::default(),
                ttl,
            }),
            "jwt" => {
                let mut opts = HashMap::new();
                for p in parts {
                    let (k, v) = p
                        .split_once('=')
                        .ok_or_else(|| TokenError::MalformedOption(p.to_string()))?;
                    opts.insert(k.to_string(), v.to_string());
                }
                let method = opts.get("sign-method").ok_or(TokenError::NoSignMethod)?;
                let alg: Algorithm = method
                    .parse()
                    .map_err(|_| TokenError::InvalidSignMethod(method.clone()))?;
                let ttl = match opts.get("ttl") {
                    Some(t) => go_duration(t).ok_or_else(|| TokenError::InvalidTtl(t.clone()))?,
                    None => DEFAULT_JWT_TTL,
                };
                let read = |k: &str| -> Result<Option<Vec<u8>>, TokenError> {
                    match opts.get(k) {
                        Some(path) => Ok(Some(std::fs::read(path).map_err(|error| {
                            TokenError::ReadKey {
                                option: k.to_string(),
                                path: path.clone(),
                                error,
                            }
                        })?)),
                        None => Ok(None),
                    }
                };
                let (sign, verify) = match alg {
                    Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                        let key = read("priv-key")?.ok_or_else(|| TokenError::MissingKey {
                            method: method.clone(),
                            option: "priv-key",
                        })?;
                        (
                            Some(EncodingKey::from_secret(&key)),
                            DecodingKey::from_secret(&key),
                        )
                    }
                    _ => {
                        let public = read("pub-key")?.ok_or_else(|| TokenError::MissingKey {
                            method: method.clone(),
                            option: "pub-key",
                        })?;
                        let private = read("priv-key")?;
                        let (sign, verify) = match alg {
                            Algorithm::ES256 | Algorithm::ES384 => (
                                private.map(|k| EncodingKey::from_ec_pem(&k)).transpose()?,
                                DecodingKey::from_ec_pem(&public)?,
                            ),
                            Algorithm::EdDSA => (
                                private.map(|k| EncodingKey::from_ed_pem(&k)).transpose()?,
                                DecodingKey::from_ed_pem(&public)?,
                            ),
                            _ => (
                                private.map(|k| EncodingKey::from_rsa_pem(&k)).transpose()?,
                                DecodingKey::from_rsa_pem(&public)?,
                            ),
                        };
                        (sign, verify)
                    }
                };
                for k in opts.keys() {
                    if !["pub-key", "priv-key", "sign-method", "ttl"].contains(&k.as_str()) {
                        return Err(TokenError::UnknownOption(k.clone()));
                    }
                }
                Ok(Tokens::Jwt(Box::new(Jwt {
                    alg,
                    sign,
                    verify,
                    ttl,
                })))
            }
            other => Err(TokenError::UnknownType(other.to_string())),
        }
    }

    /// Whether tokens are simple ones.
    pub fn is_simple(&self) -> bool {
        matches!(self, Tokens::Simple { .. })
    }

    /// The random part of a new simple token (etcd `GenTokenPrefix`: 16 letters); empty
    /// for JWT.
    pub fn prefix(&self) -> String {
        if !self.is_simple() {
            return String::new();
        }
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut rng = rand::rng();
        (0..16)
            .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
            .collect()
    }

    /// Assigns simple token `token` to `user` (every member, as it applies Authenticate).
    pub fn assign_simple(&self, token: &str, user: &str) {
        if let Tokens::Simple { live, ttl } = self {
            let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            live.retain(|_, (_, exp)| *exp > now);
            live.insert(token.to_string(), (user.to_string(), now + *ttl));
        }
    }

    /// A JWT for `user` at auth revision `revision` (JWT only; the proposing member).
    ///
    /// Errors: no private key configured, or signing failed.
    pub fn sign(&self, user: &str, revision: u64) -> Result<String, TokenError> {
        let Tokens::Jwt(j) = self else {
            return Err(TokenError::NotJwt);
        };
        let key = j.sign.as_ref().ok_or(TokenError::NoPrivateKey)?;
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            + j.ttl;
        let claims = Claims {
            username: user.to_string(),
            revision,
            exp: exp.as_secs(),
        };
        Ok(jsonwebtoken::encode(&Header::new(j.alg), &claims, key)?)
    }

    /// The Raft index a simple token was assigned at (the member waits until it has applied
    /// it before looking the token up).
    pub fn simple_index(&self, token: &str) -> Option<u64> {
        if !self.is_simple() {
            return None;
        }
        token.rsplit_once('.').and_then(|(_, i)| i.parse().ok())
    }

    /// Who `token` belongs to and the auth revision it carries (simple tokens: `current`, and
    /// the token's idle time starts again). `None`: unknown, expired or malformed.
    pub fn lookup(&self, token: &str, current: u64) -> Option<(String, u64)> {
        match self {
            Tokens::Simple { live, ttl } => {
                let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                match live.get_mut(token) {
                    Some((user, exp)) if *exp > now => {
                        *exp = now + *ttl;
                        Some((user.clone(), current))
                    }
                    Some(_) => {
                        live.remove(token);
                        None
                    }
                    None => None,
                }
            }
            Tokens::Jwt(j) => {
                let mut v = Validation::new(j.alg);
                v.leeway = 0;
                v.required_spec_claims = ["exp".to_string()].into_iter().collect();
                let data = jsonwebtoken::decode::<Claims>(token, &j.verify, &v).ok()?;
                Some((data.claims.username, data.claims.revision))
            }
        }
    }

    /// Drops every simple token of `user`.
    pub fn invalidate_user(&self, user: &str) {
        if let Tokens::Simple { live, .. } = self {
            live.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, (u, _)| u != user);
        }
    }

    /// Drops every simple token (AuthDisable).
    pub fn clear(&self) {
        if let Tokens::Simple { live, .. } = self {
            live.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_expire_when_idle_and_go_with_their_user() {
        let t = Tokens::from_flag("simple", Duration::from_millis(50)).unwrap();
        let p = t.prefix();
        assert_eq!(p.len(), 16);
        let tok = format!("{p}.7");
        assert_eq!(t.simple_index(&tok), Some(7));
        t.assign_simple(&tok, "u");
        assert_eq!(t.lookup(&tok, 3), Some(("u".into(), 3)));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.lookup(&tok, 3), None, "expired");
        t.assign_simple(&tok, "u");
        t.invalidate_user("u");
        assert_eq!(t.lookup(&tok, 3), None);
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(go_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(go_duration("1h30s"), Some(Duration::from_secs(3630)));
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("5"), None);
    }
}
