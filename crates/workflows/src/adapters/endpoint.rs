//! HTTP APIs the config names (`connections.http`): a registry, an IdP's admin API, a forge, a
//! smoke-test URL. A request goes to the connection's base URL and a path below it, never to
//! another host or above the base path, with the connection's credentials; the caller's own
//! headers may not replace them.
//!
//! Credentials are read from the environment or files, and appear in no error, log or output.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::config::{InvalidConfig, SecretReader, SecretSource};

/// The most of a response body that is read (1 MiB).
const MAX_BODY: usize = 1 << 20;

/// Why a request gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{0}")]
    Refused(String),
    #[error("{what} could not be reached: {why}")]
    Unreachable { what: String, why: String },
    #[error("{what} answered {status}, not {expected}: {body}")]
    Status {
        what: String,
        status: u16,
        expected: String,
        body: String,
    },
}

impl EndpointError {
    /// Whether asking again may work: network trouble, throttling, a server error.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Refused(_) => false,
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
        }
    }
}

// `connections.http.<name>` as the config file gives it.
/// An HTTP API.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpConnectionConfig {
    /// The base URL; requests go to paths below it: `https://keycloak.example/admin/realms/platform`.
    pub url: String,
    /// Where a bearer token is, if the API takes one.
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// A user and where the password is, for basic auth.
    #[serde(default)]
    pub basic_auth: Option<BasicAuthConfig>,
    /// Headers sent with every request whose values are credentials (`PRIVATE-TOKEN`).
    #[serde(default)]
    pub secret_headers: BTreeMap<String, SecretSource>,
    /// Headers sent with every request (`Accept: application/vnd.github+json`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Basic auth for an HTTP connection.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BasicAuthConfig {
    pub username: String,
    pub password: SecretSource,
}

/// Headers the connection's credentials and the HTTP layer own: a request may not set them.
const OWNED: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
];

fn header_name_ok(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
}

impl HttpConnectionConfig {
    /// The connection with its secrets read; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<Endpoint, InvalidConfig> {
        let mut base = url::Url::parse(&self.url)
            .map_err(|e| InvalidConfig::new(format!("{key}.url"), format!("not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(InvalidConfig::new(
                format!("{key}.url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        if base.query().is_some() || base.fragment().is_some() || !base.username().is_empty() {
            return Err(InvalidConfig::new(
                format!("{key}.url"),
                "must have no query, fragment or credentials (give them as token, basic-auth or secret-headers)",
            ));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut secret = Vec::new();
        if let Some(t) = &self.token {
            let token = read.text(t, &format!("{key}.token"))?.trim().to_string();
            secret.push(("authorization".to_string(), format!("Bearer {token}")));
        }
        if let Some(b) = &self.basic_auth {
            use base64::Engine as _;
            let password = read.text(&b.password, &format!("{key}.basic-auth.password"))?;
            let pair = format!("{}:{}", b.username, password.trim_end_matches(['\r', '\n']));
            secret.push((
                "authorization".to_string(),
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)),
            ));
        }
        if secret.len() > 1 {
            return Err(InvalidConfig::new(
                key.to_string(),
                "give token or basic-auth, not both",
            ));
        }
        for (name, src) in &self.secret_headers {
            if !header_name_ok(name) || OWNED.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(InvalidConfig::new(
                    format!("{key}.secret-headers.{name}"),
                    "is not a header a connection may set",
                ));
            }
            let v = read
                .text(src, &format!("{key}.secret-headers.{name}"))?
                .trim()
                .to_string();
            secret.push((name.to_ascii_lowercase(), v));
        }
        let mut plain = Vec::new();
        for (name, v) in &self.headers {
            if !header_name_ok(name) || OWNED.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(InvalidConfig::new(
                    format!("{key}.headers.{name}"),
                    "is not a header a connection may set (credentials go under token, basic-auth or secret-headers)",
                ));
            }
            plain.push((name.to_ascii_lowercase(), v.clone()));
        }
        Ok(Endpoint {
            base,
            secret,
            plain,
            http: super::http::client(),
        })
    }
}

/// A resolved `connections.http` entry. `Debug` shows the base URL only.
#[derive(Clone)]
pub struct Endpoint {
    base: url::Url,
    /// Credential headers (lowercase names).
    secret: Vec<(String, String)>,
    plain: Vec<(String, String)>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

/// One request to an [`Endpoint`].
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// Below the base URL: `users/42/credentials`; no `..`, no other host.
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub body: Option<Value>,
    /// The statuses that count as an answer; empty: any 2xx.
    pub expect: Vec<u16>,
}

impl Endpoint {
    /// The URL of `path` with `query`, below the base URL, or why it would leave it.
    pub fn url_of(&self, path: &str, query: &BTreeMap<String, String>) -> Result<url::Url, EndpointError> {
        let refuse = |why: &str| EndpointError::Refused(format!("path {path:?}: {why}"));
        if path.contains("://") || path.starts_with("//") || path.contains(['?', '#', '\\']) {
            return Err(refuse(
                "must be a path below the connection's URL (no host, query or fragment: give `query`)",
            ));
        }
        let mut url = self.base.clone();
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                let decoded = percent_decode(s);
                if decoded == ".." || decoded == "." || decoded.contains('/') {
                    Err(refuse(
                        "may not leave the connection's URL (`..`, `.` or an encoded `/`)",
                    ))
                } else {
                    Ok(decoded)
                }
            })
            .collect::<Result<_, _>>()?;
        {
            let mut p = url
                .path_segments_mut()
                .map_err(|_| refuse("the connection's URL takes no path"))?;
            p.pop_if_empty();
            for s in &segments {
                p.push(s);
            }
        }
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// Sends `req`; the answer as `{status, json}` (or `{status, text}` for a body that is not
    /// JSON), or an error saying what was answered instead.
    pub async fn send(&self, req: &Request) -> Result<Value, EndpointError> {
        let url = self.url_of(&req.path, &req.query)?;
        self.send_to(url, req).await
    }

    /// The connection's own credentials and headers, for an adapter that builds on it (a forge).
    pub(crate) fn new(base: url::Url, secret: Vec<(String, String)>, plain: Vec<(String, String)>) -> Self {
        Self {
            base,
            secret,
            plain,
            http: super::http::client(),
        }
    }

    /// The base URL, for an adapter that builds its own paths below it.
    pub(crate) fn base(&self) -> &url::Url {
        &self.base
    }

    /// Sends `req` to `url` (its path and query are not read): see [`Endpoint::send`].
    pub(crate) async fn send_to(&self, url: url::Url, req: &Request) -> Result<Value, EndpointError> {
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .ok()
            .filter(|m| ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()))
            .ok_or_else(|| {
                EndpointError::Refused(format!(
                    "method {:?} is not GET, HEAD, POST, PUT, PATCH or DELETE",
                    req.method
                ))
            })?;
        let what = format!("{method} {}", url.path());
        let mut builder = self.http.request(method, url);
        for (name, v) in &req.headers {
            let lower = name.to_ascii_lowercase();
            if !header_name_ok(name) || OWNED.contains(&lower.as_str()) || self.secret.iter().any(|(n, _)| *n == lower)
            {
                return Err(EndpointError::Refused(format!(
                    "header {name:?} is not one a step may set (the connection's credentials are its own)"
                )));
            }
            builder = builder.header(name.as_str(), v.as_str());
        }
        for (name, v) in self.plain.iter().chain(&self.secret) {
            builder = builder.header(name.as_str(), v.as_str());
        }
        if let Some(body) = &req.body {
            builder = builder.json(body);
        }
        let mut response = builder.send().await.map_err(|e| EndpointError::Unreachable {
            what: what.clone(),
            why: e.without_url().to_string(),
        })?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| EndpointError::Unreachable {
            what: what.clone(),
            why: e.without_url().to_string(),
        })? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(EndpointError::Refused(format!(
                    "{what}: the answer is larger than {MAX_BODY} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let ok = if req.expect.is_empty() {
            (200..300).contains(&status)
        } else {
            req.expect.contains(&status)
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !ok {
            return Err(EndpointError::Status {
                what,
                status,
                expected: if req.expect.is_empty() {
                    "2xx".into()
                } else {
                    req.expect.iter().map(u16::to_string).collect::<Vec<_>>().join(" or ")
                },
                body: text.chars().take(300).collect(),
            });
        }
        Ok(match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) if !bytes.is_empty() => json!({ "status": status, "json": v }),
            _ => json!({ "status": status, "text": text.chars().take(65536).collect::<String>() }),
        })
    }
}

/// `%XX` sequences decoded (lossy for non-UTF-8).
fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        let none = |_: &SecretSource, key: &str| Err(InvalidConfig::new(key, "no secrets here"));
        HttpConnectionConfig {
            url: url.into(),
            token: None,
            basic_auth: None,
            secret_headers: BTreeMap::new(),
            headers: BTreeMap::new(),
        }
        .resolve("connections.http.api", SecretReader::new(&none))
        .unwrap()
    }

    #[test]
    fn a_path_stays_below_the_connection_s_url() {
        let e = endpoint("https://idp.example/admin/realms/platform");
        let q = BTreeMap::from([("max".to_string(), "5".to_string())]);
        assert_eq!(
            e.url_of("clients/web app/secret", &q).unwrap().as_str(),
            "https://idp.example/admin/realms/platform/clients/web%20app/secret?max=5"
        );
        for bad in [
            "../master/users",
            "a/%2e%2e/b",
            "a%2Fb",
            "https://evil.example/x",
            "//evil.example/x",
            "a?b=c",
        ] {
            assert!(e.url_of(bad, &BTreeMap::new()).is_err(), "{bad}");
        }
        assert_eq!(
            e.url_of("", &BTreeMap::new()).unwrap().as_str(),
            "https://idp.example/admin/realms/platform"
        );
    }
}
