//! The one place HTTP clients are built. reqwest is compiled with rustls and no default crypto
//! provider (one provider, ring, for the whole binary), so the provider must be installed before
//! the first client is built; building one without it panics.

use std::time::Duration;

/// Installs ring as the process's rustls crypto provider. Idempotent; call it first in `main`.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client builder with the crypto provider installed, dayshift's user agent and sane timeouts.
pub fn builder() -> reqwest::ClientBuilder {
    install_crypto();
    reqwest::Client::builder()
        .user_agent(concat!("dayshift/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
}

/// A client with [`builder`]'s settings and a 30 s timeout per request.
pub fn client() -> reqwest::Client {
    builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client with static settings builds")
}
