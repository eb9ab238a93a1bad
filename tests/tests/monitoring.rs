//! The Prometheus rules shipped in deploy/prometheus (backups' freshness, dayshift itself), run
//! through Prometheus' own rule checker and unit tester.

use std::path::PathBuf;

#[test]
fn the_shipped_alerts_fire_when_backups_stop_or_dayshift_fails_and_only_then() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "rules", "dayshift-backups.rules.yml"],
        ["test", "rules", "dayshift-backups.rules.test.yml"],
        ["check", "rules", "dayshift.rules.yml"],
        ["test", "rules", "dayshift.rules.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool is missing: run `scripts/services.sh up` (Debian package prometheus)");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
