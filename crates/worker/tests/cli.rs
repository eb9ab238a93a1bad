//! The binary's own surface, without services. (Its presence also makes `cargo test` build the
//! `dayshift` binary that the end-to-end suite in `tests/` runs.)

use std::process::Command;

fn dayshift(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dayshift"))
        .args(args)
        .env_remove("DAYSHIFT_CONFIG")
        .output()
        .expect("run dayshift")
}

#[test]
fn help_lists_every_role() {
    let out = dayshift(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "migrate",
        "serve",
        "worker",
        "run",
        "runs",
        "workflows",
        "config",
        "bench",
    ] {
        assert!(text.contains(cmd), "--help does not mention {cmd}:\n{text}");
    }
}

#[test]
fn config_check_passes_with_defaults_and_env_only() {
    let out = Command::new(env!("CARGO_BIN_EXE_dayshift"))
        .args(["config", "check"])
        .env_remove("DAYSHIFT_CONFIG")
        .env("DAYSHIFT_DATABASE_URL", "postgres://u:p@db.example:5432/dayshift")
        .env("DAYSHIFT_REDIS_URL", "redis://cache.example:6379/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("config ok"));
}

#[test]
fn a_missing_config_file_is_named() {
    let out = dayshift(&["--config", "/nonexistent/dayshift.yaml", "config", "check"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/dayshift.yaml"), "{err}");
}

#[test]
fn a_bad_url_in_the_environment_is_refused_before_connecting() {
    let out = Command::new(env!("CARGO_BIN_EXE_dayshift"))
        .args(["config", "check"])
        .env("DAYSHIFT_DATABASE_URL", "mysql://nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url must start with postgres://"));
}

#[test]
fn the_example_config_in_deploy_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/dayshift.example.yaml");
    let out = dayshift(&["--config", path, "config", "check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_published_config_schema_is_up_to_date() {
    let out = dayshift(&["config", "schema"]);
    assert!(out.status.success());
    let published =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.schema.json")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        published,
        "docs/config.schema.json is stale: run `dayshift config schema > docs/config.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&published).unwrap();
    let schedule = &schema["$defs"]["ScheduleConfig"]["properties"];
    for key in ["name", "cron", "timezone", "workflow", "input", "catch-up", "overlap"] {
        assert!(schedule.get(key).is_some(), "the schema lacks schedules[].{key}");
    }
}
