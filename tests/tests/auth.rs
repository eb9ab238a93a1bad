//! The API's tokens and roles, and the audit trail, against a real `dayshift serve`.

use std::time::Duration;

use dayshift_tests::BinEnv;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(30);

/// A call with an optional bearer token; the status and the `WWW-Authenticate` header.
async fn call(env: &BinEnv, method: &str, path: &str, token: Option<&str>) -> (u16, Option<String>) {
    let client = dayshift_workflows::adapters::http::client();
    let url = format!("{}{path}", env.api);
    let mut req = match method {
        "GET" => client.get(url),
        "POST" => client.post(url).json(&json!({})),
        "DELETE" => client.delete(url),
        other => panic!("{other}"),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), challenge)
}

#[tokio::test]
async fn each_endpoint_refuses_callers_without_the_role_it_needs() {
    let env = BinEnv::start().await;
    let viewer = env.token_for("vera", "viewer").await;
    let operator = env.token_for("otto", "operator").await;
    let admin = env.token.clone();
    let run = env.start_run("selftest.gate", json!({})).await;
    let endpoints: Vec<(&str, String, &str)> = vec![
        ("GET", "/api/v1/workflows".into(), "viewer"),
        ("GET", "/api/v1/runs".into(), "viewer"),
        ("GET", format!("/api/v1/runs/{run}"), "viewer"),
        ("GET", format!("/api/v1/runs/{run}/events"), "viewer"),
        ("GET", "/api/v1/schedules".into(), "viewer"),
        ("GET", "/api/v1/remediations".into(), "viewer"),
        ("GET", "/api/v1/alerts/episodes".into(), "viewer"),
        ("GET", "/api/v1/approvals".into(), "viewer"),
        ("GET", "/api/v1/runs/summary".into(), "viewer"),
        ("GET", "/api/v1/whoami".into(), "viewer"),
        ("GET", format!("/api/v1/runs/{run}/trigger"), "viewer"),
        ("POST", format!("/api/v1/runs/{run}/retry"), "operator"),
        ("POST", "/api/v1/runs".into(), "operator"),
        ("POST", format!("/api/v1/runs/{run}/signals/approve"), "operator"),
        ("POST", format!("/api/v1/runs/{run}/approve"), "operator"),
        ("POST", format!("/api/v1/runs/{run}/reject"), "operator"),
        ("POST", format!("/api/v1/runs/{run}/cancel"), "operator"),
        ("POST", "/api/v1/schedules/nightly/pause".into(), "admin"),
        ("POST", "/api/v1/schedules/nightly/resume".into(), "admin"),
        ("POST", "/api/v1/schedules/nightly/trigger".into(), "admin"),
        ("GET", "/api/v1/tokens".into(), "admin"),
        ("POST", "/api/v1/tokens".into(), "admin"),
        ("DELETE", "/api/v1/tokens/nobody".into(), "admin"),
        ("GET", "/api/v1/audit".into(), "admin"),
    ];
    let rank = |r: &str| ["viewer", "operator", "admin"].iter().position(|x| *x == r).unwrap();
    for (method, path, needs) in &endpoints {
        let (status, challenge) = call(&env, method, path, None).await;
        assert_eq!(status, 401, "{method} {path} without a token");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"dayshift\""));
        let (status, _) = call(&env, method, path, Some("dsh_0000000000000000")).await;
        assert_eq!(status, 401, "{method} {path} with an unknown token");
        for (role, token) in [("viewer", &viewer), ("operator", &operator), ("admin", &admin)] {
            let (status, _) = call(&env, method, path, Some(token)).await;
            if rank(role) < rank(needs) {
                assert_eq!(status, 403, "{method} {path} as {role} (needs {needs})");
            } else {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} as {role} (needs {needs}): {status}"
                );
            }
        }
    }
    // Health, readiness, metrics, webhooks (signed on their own) and the console's page and
    // scripts (which hold no data) need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/console/", "/console/js/app.js"] {
        assert_eq!(call(&env, "GET", path, None).await.0, 200, "{path}");
    }
    assert_eq!(
        call(&env, "POST", "/hooks/github", None).await.0,
        404,
        "not configured, not 401"
    );
}

#[tokio::test]
async fn tokens_are_stored_hashed_and_a_revoked_one_stops_working_within_the_cache_time_and_at_once_through_the_api() {
    let ttl = Duration::from_secs(1);
    let env = BinEnv::start_with_server("  token-cache-ttl: 1s\n", "").await;
    let cli = |args: &[&str]| env.local_cli(args);
    let out = cli(&["tokens", "create", "ci", "--role", "operator"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("dsh_") && token.len() > 60, "{token}");
    assert_eq!(call(&env, "GET", "/api/v1/runs", Some(&token)).await.0, 200);

    // Not in the database in clear, nor in what the API lists.
    let dump = env.db.dump().await;
    assert!(dump.contains("api_tokens"), "the dump has the table");
    assert!(
        !dump.contains(&token) && !dump.contains(&token[4..]),
        "a token is stored in clear"
    );
    let (_, listed) = env.get("/api/v1/tokens").await;
    assert!(!listed.to_string().contains(&token[4..]));
    let ci = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap()
        .clone();
    assert_eq!(ci["role"], "operator");
    assert!(ci["last_used_at"].is_string(), "{ci}");
    let out = cli(&["tokens", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ci "), "{out:?}");

    // Revoked in the database (the CLI): refused once serve's lookup of it is older than
    // `server.token-cache-ttl`, and from then on.
    let out = cli(&["tokens", "revoke", "ci"]);
    let revoked = tokio::time::Instant::now();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    while call(&env, "GET", "/api/v1/runs", Some(&token)).await.0 != 401 {
        assert!(
            revoked.elapsed() < ttl + Duration::from_secs(2),
            "a revoked token still works"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(&env, "GET", "/api/v1/runs", Some(&token)).await.0, 401);
    let out = cli(&["tokens", "revoke", "ci"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live token named 'ci'"));

    // Through the API (admin): created, used, revoked; an expired token is refused.
    let (status, made) = env
        .post("/api/v1/tokens", &json!({ "name": "deploy-bot", "role": "viewer" }))
        .await;
    assert_eq!(status, 201, "{made}");
    let bot = made["token"].as_str().unwrap().to_string();
    assert_eq!(call(&env, "GET", "/api/v1/runs", Some(&bot)).await.0, 200);
    // Revoked through this serve: the very next call is refused, its lookup fresh or not.
    assert_eq!(
        call(&env, "DELETE", "/api/v1/tokens/deploy-bot", Some(&env.token))
            .await
            .0,
        200
    );
    assert_eq!(call(&env, "GET", "/api/v1/runs", Some(&bot)).await.0, 401);
    let (status, made) = env
        .post(
            "/api/v1/tokens",
            &json!({ "name": "brief", "role": "viewer", "expires_in": "1s" }),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let brief = made["token"].as_str().unwrap().to_string();
    let expired = tokio::time::Instant::now() + Duration::from_secs(1);
    tokio::time::sleep_until(expired + Duration::from_millis(100)).await;
    assert_eq!(call(&env, "GET", "/api/v1/runs", Some(&brief)).await.0, 401);
    // Bad input says what is wrong.
    let (status, body) = env
        .post("/api/v1/tokens", &json!({ "name": "x", "role": "root" }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("role"), "{body}");
}

#[tokio::test]
async fn who_did_what_to_which_run_is_in_the_audit_trail() {
    let env = BinEnv::start().await;
    let _worker = env.start_worker().await;
    let alice = env.as_user("alice").await;
    let bob = env.as_user("bob").await;
    let (status, started) = env
        .post_as(
            &alice,
            "/api/v1/runs",
            &json!({ "workflow": "selftest.gate", "input": {} }),
        )
        .await;
    assert_eq!(status, 201, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    env.wait_run(&id, LIMIT, |r| r["status"] == "waiting").await;

    // Nobody approves as somebody else.
    let (status, body) = env
        .post_as(&bob, &format!("/api/v1/runs/{id}/approve"), &json!({ "by": "alice" }))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("cannot decide as 'alice'"));

    let (status, _) = env
        .post_as(
            &bob,
            &format!("/api/v1/runs/{id}/cancel"),
            &json!({ "reason": "not today" }),
        )
        .await;
    assert_eq!(status, 202);
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["started_by"], "api:token:alice");
    let (_, events) = env.get(&format!("/api/v1/runs/{id}/events")).await;
    let cancel = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "cancel_requested")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(cancel["detail"]["by"], "token:bob", "{events:#}");

    let (_, audit) = env.get(&format!("/api/v1/audit?target={id}")).await;
    let entries: Vec<(String, String, String)> = audit["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["role"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (
                "token:bob".to_string(),
                "operator".to_string(),
                "run.cancel".to_string()
            ),
            (
                "token:bob".to_string(),
                "operator".to_string(),
                "run.approve.refused".to_string()
            ),
            (
                "token:alice".to_string(),
                "operator".to_string(),
                "run.start".to_string()
            ),
        ]
    );
    let out = env.local_cli(&["audit", "--target", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("bob") && text.contains("run.cancel") && text.contains("not today"),
        "{text}"
    );
}

/// A JWT as the platform's identity provider would issue it.
fn jwt(key: &str, claims: &Value) -> String {
    let pem = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/oidc")
            .join(key),
    )
    .unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("platform-sso-1".into());
    jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

#[tokio::test]
async fn tokens_of_the_platforms_identity_provider_carry_the_role_their_groups_grant() {
    // The provider's signing keys, served as Keycloak serves them.
    let jwks =
        std::fs::read_to_string(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/oidc/jwks.json"))
            .unwrap();
    let app = axum::Router::new().route(
        "/realms/platform/protocol/openid-connect/certs",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { ([("content-type", "application/json")], jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sso = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let issuer = format!("{sso}/realms/platform");
    let mut env = BinEnv::start().await;
    let config = std::fs::read_to_string(&env.config_path).unwrap().replace(
        "server:\n",
        &format!(
            "server:\n  oidc:\n    issuer: {issuer}\n    audience: dayshift\n    \
             jwks-url: {issuer}/protocol/openid-connect/certs\n    roles-claim: realm_access.roles\n    \
             roles: {{ operator: [platform-oncall], viewer: [platform] }}\n"
        ),
    );
    std::fs::write(&env.config_path, config).unwrap();
    env.server.as_mut().unwrap().kill9().await;
    env.start_server().await;
    let now = chrono::Utc::now().timestamp();
    let claims = |user: &str, roles: &[&str]| {
        json!({
            "iss": issuer, "aud": "dayshift", "sub": format!("uuid-{user}"), "preferred_username": user,
            "iat": now, "exp": now + 300, "realm_access": { "roles": roles },
        })
    };
    let alice = jwt("signing-key.pem", &claims("alice", &["platform", "platform-oncall"]));
    let bob = jwt("signing-key.pem", &claims("bob", &["platform"]));
    let start = json!({ "workflow": "selftest.gate", "input": {} });

    // Alice is on call: an operator, named as herself.
    let (status, started) = env.post_as(&alice, "/api/v1/runs", &start).await;
    assert_eq!(status, 201, "{started}");
    let (_, run) = env
        .get(&format!("/api/v1/runs/{}", started["id"].as_str().unwrap()))
        .await;
    // Namespaced: an OIDC user is never taken for the API token of the same name.
    assert_eq!(run["started_by"], "api:oidc:alice");
    // Bob may look, not act.
    assert_eq!(env.get_as(&bob, "/api/v1/runs").await.0, 200);
    let (status, body) = env.post_as(&bob, "/api/v1/runs", &start).await;
    assert_eq!(status, 403, "{body}");

    // Refused, each saying why: no role, expired, for another audience, signed by someone else.
    let carol = jwt("signing-key.pem", &claims("carol", &["finance"]));
    let (status, body) = env.get_as(&carol, "/api/v1/runs").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("'carol' has no dayshift role"),
        "{body}"
    );
    let mut expired = claims("alice", &["platform"]);
    expired["exp"] = json!(now - 3600);
    let mut elsewhere = claims("alice", &["platform"]);
    elsewhere["aud"] = json!("grafana");
    for (token, why) in [
        (jwt("signing-key.pem", &expired), "ExpiredSignature"),
        (jwt("signing-key.pem", &elsewhere), "InvalidAudience"),
        (
            jwt("other-key.pem", &claims("mallory", &["platform-oncall"])),
            "InvalidSignature",
        ),
    ] {
        let (status, body) = env.get_as(&token, "/api/v1/runs").await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(body["error"].as_str().unwrap().contains(why), "{why}: {body}");
    }
    // dayshift's own tokens still work beside them.
    assert_eq!(env.get("/api/v1/runs").await.0, 200);
    server.abort();
}
