//! Where the shared services are and how a test keeps to a part of its own: the addresses
//! `scripts/services.sh` exports (PostgreSQL, Redis, SeaweedFS), unique names and free ports.
//!
//! A test whose service is missing fails with a message saying what to run; it never skips.

/// The PostgreSQL server URL from the environment (the services script's).
pub fn database_url() -> String {
    std::env::var("DAYSHIFT_DATABASE_URL")
        .expect("DAYSHIFT_DATABASE_URL is not set: run `scripts/services.sh up` and `source .dayshift/env`")
}

/// The Redis URL from the environment (the services script's).
pub fn redis_url() -> String {
    std::env::var("DAYSHIFT_REDIS_URL")
        .expect("DAYSHIFT_REDIS_URL is not set: run `scripts/services.sh up` and `source .dayshift/env`")
}

/// A short unique suffix.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// The shared test bucket of the local SeaweedFS (tests keep to key prefixes of their own; a
/// bucket per test would use up its volumes). `secret` replaces the secret key, to test refusal.
pub fn s3_test_config(secret: Option<&str>) -> dayshift_workflows::adapters::s3::S3Config {
    let env = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k} is not set: run `scripts/services.sh up` and source .dayshift/env"))
    };
    dayshift_workflows::adapters::s3::S3Config {
        endpoint: Some(env("DAYSHIFT_S3_ENDPOINT")),
        region: env("DAYSHIFT_S3_REGION"),
        bucket: "dayshift-test".into(),
        access_key: env("DAYSHIFT_S3_ACCESS_KEY"),
        secret_key: secret
            .map(str::to_string)
            .unwrap_or_else(|| env("DAYSHIFT_S3_SECRET_KEY")),
        path_style: true,
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
