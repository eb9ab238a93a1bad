//! The web console: a page and its scripts, built into the binary and served by `dayshift
//! serve` at `/console/`. It holds no data and needs no session of its own: the person signs
//! in with an API token (or an OIDC access token), and every view is a call to `/api/v1` with
//! it, so the console can do exactly what the token's role may do through the API.
//!
//! The assets are plain HTML, CSS and JavaScript modules in `crates/engine/console/` (no build
//! step). They are sent with a strict Content-Security-Policy: scripts and styles only from
//! here, no inline script, no framing.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};

use crate::api::access::{Access, Routes};

/// One file of the console: its path under `/console/`, media type and content.
struct Asset {
    path: &'static str,
    media_type: &'static str,
    body: &'static [u8],
}

macro_rules! assets {
    ($($path:literal => $media_type:expr),+ $(,)?) => {
        &[$(Asset {
            path: $path,
            media_type: $media_type,
            body: include_bytes!(concat!("../../console/", $path)),
        }),+]
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = assets! {
    "index.html" => "text/html; charset=utf-8",
    "console.css" => "text/css; charset=utf-8",
    "favicon.svg" => "image/svg+xml",
    "js/app.js" => JS,
    "js/api.js" => JS,
    "js/dom.js" => JS,
    "js/views/runs.js" => JS,
    "js/views/run.js" => JS,
    "js/views/approvals.js" => JS,
    "js/views/schedules.js" => JS,
    "js/views/remediations.js" => JS,
    "js/views/workflows.js" => JS,
    "js/views/workflow.js" => JS,
};

/// Each asset's ETag: a digest of its content, so a browser revalidates and gets a 304 until
/// the binary ships another version.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.body))[..16]))
        .collect()
});

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes: `/` and `/console` lead to `/console/`. Public: the files hold no
/// data.
pub(crate) fn routes(routes: Routes) -> Routes {
    routes
        .get("/", Access::Public, || async { Redirect::to("/console/") })
        .get("/console", Access::Public, || async { Redirect::to("/console/") })
        .get("/console/", Access::Public, |headers: HeaderMap| async move {
            asset("index.html", &headers)
        })
        .get(
            "/console/{*path}",
            Access::Public,
            |Path(path): Path<String>, headers: HeaderMap| async move { asset(&path, &headers) },
        )
}

fn asset(path: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return (StatusCode::NOT_FOUND, format!("the console has no file '{path}'")).into_response();
    };
    let (a, etag) = (&ASSETS[i], &ETAGS[i]);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.media_type)], a.body).into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(etag).expect("hex is a valid header value"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
