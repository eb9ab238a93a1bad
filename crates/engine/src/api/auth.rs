//! Who may call the API: bearer tokens with a role, stored hashed, and the audit trail of what
//! each caller did.
//!
//! Roles, each including the ones before it:
//! - `viewer`: reads runs, events, schedules, workflows, remediations;
//! - `operator`: also starts, cancels and signals runs, approves and rejects;
//! - `admin`: also manages tokens and schedules (pause, resume, trigger) and reads the audit.
//!
//! Which role each route needs is declared with the route ([`crate::api`]); `/healthz`,
//! `/readyz`, `/metrics` (unless configured otherwise), the console's files and the intakes
//! (`/hooks/…`, which check their own signatures) need no token.
//!
//! Besides dayshift's own tokens, JWTs of the platform's OpenID Connect provider can be
//! accepted ([`Oidc`]): the caller is named by a claim and gets the role its groups map to.

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::Serialize;
use serde_json::Value;
use sha2::Digest as _;
use sqlx::PgPool;

use crate::core::error::{ConfigError, StoreError};
use crate::core::store::PgStore;
use crate::identity::UnknownRole;
pub use crate::identity::{Caller, Role, bearer, same};

/// How the API authenticates.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Serve `/metrics` without a token (the default: Prometheus scrapes it).
    pub public_metrics: bool,
    /// Also accept JWTs of this OpenID Connect provider.
    pub oidc: Option<std::sync::Arc<Oidc>>,
    /// How long a dayshift token's lookup is reused (`server.token-cache-ttl`); zero looks it up
    /// on every request.
    pub token_cache_ttl: std::time::Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            public_metrics: true,
            oidc: None,
            token_cache_ttl: std::time::Duration::from_secs(5),
        }
    }
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A token's prefix, so one found in a log or a repository is recognised as dayshift's.
pub const TOKEN_PREFIX: &str = "dsh_";

fn hash(token: &str) -> Vec<u8> {
    sha2::Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates a token named `name` with `role`; returns the token, shown this once.
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
    created_by: &str,
) -> Result<String, StoreError> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(StoreError::Conflict(
            "a token name must be 1 to 200 printable characters".into(),
        ));
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let store = PgStore::new(pool.clone());
    store
        .insert_token(name, &role.to_string(), &hash(&token), created_by, expires_at)
        .await?;
    audit(
        pool,
        created_by,
        None,
        "token.create",
        Some(name),
        serde_json::json!({ "role": role }),
    )
    .await?;
    Ok(token)
}

/// Revokes the live token named `name`; it stops working at once. `false` if there is none.
pub async fn revoke_token(pool: &PgPool, name: &str, by: &str) -> Result<bool, StoreError> {
    let done = PgStore::new(pool.clone()).revoke_token(name).await?;
    if done {
        audit(pool, by, None, "token.revoke", Some(name), Value::Null).await?;
    }
    Ok(done)
}

/// Every token, live ones first, newest first.
pub async fn list_tokens(pool: &PgPool) -> Result<Vec<TokenInfo>, StoreError> {
    PgStore::new(pool.clone())
        .tokens()
        .await?
        .into_iter()
        .map(|r| {
            Ok(TokenInfo {
                name: r.name,
                role: r.role.parse().map_err(|e: UnknownRole| StoreError::Conflict(e.0))?,
                created_at: r.created_at,
                created_by: r.created_by,
                expires_at: r.expires_at,
                revoked_at: r.revoked_at,
                last_used_at: r.last_used_at,
            })
        })
        .collect()
}

/// The caller a token belongs to, if it is live (not revoked, not expired), looked up now.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<Caller>, StoreError> {
    Ok(look_up(pool, token).await?.map(|(caller, _)| caller))
}

/// [`authenticate`], and until when the token is valid (if it expires).
async fn look_up(pool: &PgPool, token: &str) -> Result<Option<(Caller, Option<DateTime<Utc>>)>, StoreError> {
    if !token.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    PgStore::new(pool.clone())
        .live_token(&hash(token))
        .await?
        .map(|(name, role, expires)| {
            let role = role.parse().map_err(|e: UnknownRole| StoreError::Conflict(e.0))?;
            Ok((Caller::token(&name, role), expires))
        })
        .transpose()
}

/// The live tokens `serve` looked up lately, by hash, each reused for at most `ttl` (and never
/// past its expiry), so that a client's burst of requests reads its token once rather than on
/// every request. A revocation through this `serve` empties it at once; one made elsewhere
/// (`dayshift tokens revoke`, another replica) takes effect here within `ttl`. Unknown, revoked
/// and expired tokens are not kept: each is looked up again.
#[derive(Debug)]
pub(crate) struct TokenCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (Caller, std::time::Instant)>>,
}

/// The most tokens kept; past it the cache starts over (tokens are few, callers fewer).
const TOKEN_CACHE_MAX: usize = 4096;

impl TokenCache {
    pub(crate) fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: Default::default(),
        }
    }

    /// The caller `token` belongs to, from the cache while it is fresh, else from PostgreSQL.
    pub(crate) async fn authenticate(&self, pool: &PgPool, token: &str) -> Result<Option<Caller>, StoreError> {
        if self.ttl.is_zero() {
            return authenticate(pool, token).await;
        }
        let key = hash(token);
        let now = std::time::Instant::now();
        if let Some((caller, until)) = self.entries.lock().expect("token cache").get(&key)
            && *until > now
        {
            return Ok(Some(caller.clone()));
        }
        let Some((caller, expires)) = look_up(pool, token).await? else {
            self.entries.lock().expect("token cache").remove(&key);
            return Ok(None);
        };
        let mut until = now + self.ttl;
        if let Some(expires) = expires {
            until = until.min(now + (expires - Utc::now()).to_std().unwrap_or_default());
        }
        let mut entries = self.entries.lock().expect("token cache");
        if entries.len() >= TOKEN_CACHE_MAX {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= TOKEN_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, (caller.clone(), until));
        Ok(Some(caller))
    }

    /// Forgets every token: after a revocation.
    pub(crate) fn forget_all(&self) {
        self.entries.lock().expect("token cache").clear();
    }
}

/// Records that `actor` did `action` to `target`.
pub async fn audit(
    pool: &PgPool,
    actor: &str,
    role: Option<Role>,
    action: &str,
    target: Option<&str>,
    detail: Value,
) -> Result<(), StoreError> {
    let detail = if detail.is_null() {
        serde_json::json!({})
    } else {
        detail
    };
    PgStore::new(pool.clone())
        .audit(actor, role.map(|r| r.to_string()).as_deref(), action, target, detail)
        .await
}

/// One audit entry.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub role: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub detail: Value,
}

/// The audit trail, newest first; only entries about `target` if given.
pub async fn list_audit(pool: &PgPool, target: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
    Ok(PgStore::new(pool.clone())
        .audit_entries(target, limit)
        .await?
        .into_iter()
        .map(|r| AuditEntry {
            at: r.at,
            actor: r.actor,
            role: r.role,
            action: r.action,
            target: r.target,
            detail: r.detail,
        })
        .collect())
}

// OpenID Connect: JWTs issued by the platform's identity provider, accepted beside dayshift's
// own tokens. The config file's `server.oidc`, as `Oidc::new` takes it; its doc comments are
// the schema's descriptions.
/// An OpenID Connect provider whose tokens the API accepts.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OidcConfig {
    /// The tokens' `iss`, e.g. `https://sso.example.com/realms/platform`.
    pub issuer: String,
    /// The tokens' `aud`: the client id dayshift is registered as.
    pub audience: String,
    /// The provider's signing keys (JWKS), e.g. `<issuer>/protocol/openid-connect/certs`.
    pub jwks_url: String,
    /// The claim naming the caller. Default `preferred_username`.
    // Recorded as who did what.
    #[serde(default = "preferred_username")]
    pub username_claim: String,
    /// The claim with the caller's groups; a dotted path for nested ones (Keycloak:
    /// `realm_access.roles`). Default `groups`.
    #[serde(default = "groups")]
    pub roles_claim: String,
    /// Which groups grant which role, e.g. `{ operator: [platform-oncall], viewer: [platform] }`;
    /// the strongest role granted wins.
    // Written as a map by role; held as pairs, in the order of the roles.
    #[serde(deserialize_with = "roles_by_role")]
    #[schemars(with = "std::collections::BTreeMap<Role, Vec<String>>")]
    pub roles: Vec<(Role, Vec<String>)>,
}

fn preferred_username() -> String {
    "preferred_username".into()
}

fn groups() -> String {
    "groups".into()
}

fn roles_by_role<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(Role, Vec<String>)>, D::Error> {
    let roles: std::collections::BTreeMap<Role, Vec<String>> = serde::Deserialize::deserialize(d)?;
    Ok(roles.into_iter().collect())
}

/// Why an OIDC token was refused.
#[derive(Debug)]
pub enum OidcRefusal {
    /// Not a valid token of the configured provider (401).
    Invalid(String),
    /// A valid token whose claims grant no role (403).
    NoRole(String),
}

/// Verifies OIDC tokens against the provider's keys, fetched from its JWKS URL and cached.
///
/// # Design notes
/// Every login may name a key id, and anyone can send a token naming a random one, so:
/// - the cache is read without waiting on a fetch: a fetch happens outside its lock, one at a
///   time (single flight); logins with known keys never wait for it;
/// - an unknown key id refetches at most every [`REFETCH_AFTER`], and a failed fetch is
///   remembered for [`FAILURE_TTL`]: a slow or down provider costs each refused login nothing;
/// - [`Oidc::refresh_every`] refetches the keys in the background, so a rotation is picked up
///   before the first token signed with the new key arrives.
pub struct Oidc {
    config: OidcConfig,
    http: reqwest::Client,
    cache: std::sync::RwLock<KeyCache>,
    fetching: tokio::sync::Mutex<()>,
    /// Fetches finished, so that logins that waited for one do not fetch again.
    fetches: std::sync::atomic::AtomicU64,
    refetch_after: std::time::Duration,
    failure_ttl: std::time::Duration,
}

/// An unknown key id refetches the keys at most this often.
pub const REFETCH_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// A failed fetch is not retried for this long.
pub const FAILURE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a fetch of the provider's keys may take.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

crate::message_error!(
    /// Why the provider's signing keys could not be fetched (the HTTP client's error).
    KeysNotFetched
);

#[derive(Default)]
struct KeyCache {
    keys: Option<jsonwebtoken::jwk::JwkSet>,
    fetched_at: Option<std::time::Instant>,
    failed: Option<(std::time::Instant, String)>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Oidc {
    pub fn new(config: OidcConfig) -> Result<Self, ConfigError> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("OIDC: cannot build an HTTP client: {e}"))?;
        Ok(Self {
            config,
            http,
            cache: Default::default(),
            fetching: tokio::sync::Mutex::new(()),
            fetches: Default::default(),
            refetch_after: REFETCH_AFTER,
            failure_ttl: FAILURE_TTL,
        })
    }

    /// Other times than [`REFETCH_AFTER`] and [`FAILURE_TTL`] (tests, tuning).
    pub fn with_cache_times(mut self, refetch_after: std::time::Duration, failure_ttl: std::time::Duration) -> Self {
        self.refetch_after = refetch_after;
        self.failure_ttl = failure_ttl;
        self
    }

    /// Refetches the provider's keys every `period` until the process ends (a key the provider
    /// removed stops working within it).
    pub fn refresh_every(self: std::sync::Arc<Self>, period: std::time::Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let _one = self.fetching.lock().await;
                if let Err(e) = self.fetch().await {
                    tracing::warn!(error = %e, "OIDC signing keys could not be refreshed; keeping the ones known.");
                }
            }
        })
    }

    fn cached(&self, kid: &str) -> Option<jsonwebtoken::jwk::Jwk> {
        let cache = self.cache.read().expect("key cache");
        cache.keys.as_ref().and_then(|set| set.find(kid).cloned())
    }

    /// Why an unknown key id is not fetched for now, if it is not.
    fn fetch_refused(&self, kid: &str) -> Option<String> {
        let cache = self.cache.read().expect("key cache");
        if let Some((at, why)) = &cache.failed
            && at.elapsed() < self.failure_ttl
        {
            return Some(format!(
                "cannot read the signing keys at {}: {why}",
                self.config.jwks_url
            ));
        }
        cache
            .fetched_at
            .filter(|at| at.elapsed() < self.refetch_after)
            .map(|_| format!("no signing key '{kid}' at {}", self.config.jwks_url))
    }

    /// Fetches the keys into the cache. Call with `fetching` held.
    async fn fetch(&self) -> Result<(), KeysNotFetched> {
        let fetched: Result<jsonwebtoken::jwk::JwkSet, reqwest::Error> = async {
            self.http
                .get(&self.config.jwks_url)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
        }
        .await;
        let mut cache = self.cache.write().expect("key cache");
        self.fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match fetched {
            Ok(set) => {
                *cache = KeyCache {
                    keys: Some(set),
                    fetched_at: Some(std::time::Instant::now()),
                    failed: None,
                };
                Ok(())
            }
            Err(e) => {
                let why = e.to_string();
                cache.failed = Some((std::time::Instant::now(), why.clone()));
                Err(KeysNotFetched(why))
            }
        }
    }

    async fn key(&self, kid: &str) -> Result<jsonwebtoken::DecodingKey, OidcRefusal> {
        let jwk = match self.cached(kid) {
            Some(jwk) => jwk,
            None => {
                if let Some(why) = self.fetch_refused(kid) {
                    return Err(OidcRefusal::Invalid(why));
                }
                // One fetch at a time; whoever waited for it takes what it fetched.
                let seen = self.fetches.load(std::sync::atomic::Ordering::SeqCst);
                let _one = self.fetching.lock().await;
                let fetched_meanwhile = self.fetches.load(std::sync::atomic::Ordering::SeqCst) != seen;
                match self.cached(kid) {
                    Some(jwk) => jwk,
                    None if fetched_meanwhile => {
                        let cache = self.cache.read().expect("key cache");
                        return Err(OidcRefusal::Invalid(match &cache.failed {
                            Some((_, why)) => {
                                format!("cannot read the signing keys at {}: {why}", self.config.jwks_url)
                            }
                            None => format!("no signing key '{kid}' at {}", self.config.jwks_url),
                        }));
                    }
                    None => {
                        if let Some(why) = self.fetch_refused(kid) {
                            return Err(OidcRefusal::Invalid(why));
                        }
                        self.fetch().await.map_err(|e| {
                            OidcRefusal::Invalid(format!(
                                "cannot read the signing keys at {}: {e}",
                                self.config.jwks_url
                            ))
                        })?;
                        self.cached(kid).ok_or_else(|| {
                            OidcRefusal::Invalid(format!("no signing key '{kid}' at {}", self.config.jwks_url))
                        })?
                    }
                }
            }
        };
        jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| OidcRefusal::Invalid(format!("signing key '{kid}': {e}")))
    }

    /// The caller a token names, if the provider signed it for dayshift and it grants a role.
    pub async fn verify(&self, token: &str) -> Result<Caller, OidcRefusal> {
        use jsonwebtoken::Algorithm;
        let header = jsonwebtoken::decode_header(token).map_err(|e| OidcRefusal::Invalid(e.to_string()))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::ES256
                | Algorithm::ES384
        ) {
            return Err(OidcRefusal::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| OidcRefusal::Invalid("the token names no signing key (kid)".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        // A token not valid yet (`nbf`) is refused too; 30 s of leeway for clock skew.
        validation.validate_nbf = true;
        validation.leeway = 30;
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| OidcRefusal::Invalid(e.to_string()))?
            .claims;
        let name = claims
            .get(&self.config.username_claim)
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| OidcRefusal::Invalid(format!("the token has no '{}' claim", self.config.username_claim)))?
            .to_string();
        let mut held = &claims;
        for part in self.config.roles_claim.split('.') {
            held = &held[part];
        }
        let held: Vec<&str> = match held {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            Value::String(s) => s.split([' ', ',']).filter(|s| !s.is_empty()).collect(),
            _ => Vec::new(),
        };
        let role = self
            .config
            .roles
            .iter()
            .filter(|(_, values)| values.iter().any(|v| held.contains(&v.as_str())))
            .map(|(role, _)| *role)
            .max()
            .ok_or_else(|| {
                OidcRefusal::NoRole(format!(
                    "'{name}' has no dayshift role: its {} ({}) grant none",
                    self.config.roles_claim,
                    if held.is_empty() {
                        "none".to_string()
                    } else {
                        held.join(", ")
                    }
                ))
            })?;
        Ok(Caller {
            name: format!("oidc:{name}"),
            role,
            groups: held.into_iter().map(str::to_string).collect(),
        })
    }
}
