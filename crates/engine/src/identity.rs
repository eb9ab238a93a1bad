//! Who is calling: an authenticated caller's identity and role, and the two primitives every
//! credential check uses (reading a bearer token, comparing secrets in constant time). The
//! API's authentication ([`crate::api::auth`]), the policy, approvals and the trigger intakes
//! all take these from here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        })
    }
}

crate::message_error!(
    /// A role name that is none of the roles: the name, and the ones there are.
    UnknownRole
);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(UnknownRole(format!(
                "unknown role '{other}'; use viewer, operator or admin"
            ))),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    /// Who it is, namespaced so that a token and an OIDC user never share an identity:
    /// `token:<the token's name>` or `oidc:<the username claim>`. Recorded as who did what.
    pub name: String,
    pub role: Role,
    /// The OIDC groups (or roles) the token's claim lists; none for an API token.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Caller {
    /// The caller of an API token named `name`.
    pub fn token(name: &str, role: Role) -> Self {
        Self {
            name: format!("token:{name}"),
            role,
            groups: Vec::new(),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value (the scheme in any case).
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares two secrets in time that depends only on their lengths.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
