//! Golden tests of the values edit on real-world-shaped files (tests/fixtures/values): comments,
//! anchors and merge keys, flow mappings, multi-document files, every quoting style, CRLF line
//! endings. The commit a promotion makes must differ from the file in the intended line alone.

use dayshift_workflows::gitops::values::set;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/fixtures/values/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Edits `file` and checks that exactly line `line` changed, to `expected`.
fn golden(file: &str, path: &str, value: &str, line: usize, expected: &str) {
    let text = fixture(file);
    let (out, change) = set(&text, path, value).unwrap_or_else(|e| panic!("{file} {path}: {e}"));
    assert_eq!(change.line, line, "{file} {path}");
    let before: Vec<&str> = text.split_inclusive('\n').collect();
    let after: Vec<&str> = out.split_inclusive('\n').collect();
    assert_eq!(before.len(), after.len(), "{file} {path}: the number of lines changed");
    let changed: Vec<usize> = (0..before.len()).filter(|i| before[*i] != after[*i]).collect();
    assert_eq!(changed, vec![line - 1], "{file} {path}: other lines changed");
    assert_eq!(after[line - 1], expected, "{file} {path}");
}

#[test]
fn helm_values_keep_comments_anchors_and_quoting() {
    let f = "umbrella-values-prod.yaml";
    golden(
        f,
        "api-gateway.image.tag",
        "2.15.0",
        24,
        "    tag: \"2.15.0\"          # promoted 2026-11-20 by run 01a1f...\n",
    );
    golden(f, "checkout.image.tag", "v3.3.0", 37, "    tag: 'v3.3.0'\n");
    golden(
        f,
        "checkout.image.digest",
        "sha256:9c7a1e3b5d7f9a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a9c",
        39,
        "    digest: \"sha256:9c7a1e3b5d7f9a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a9c\"\n",
    );
    // A plain 1.10 would be the number 1.1: the new value is quoted, the comment stays.
    golden(
        f,
        "catalog.image.tag",
        "1.10",
        53,
        "    tag: \"1.10\"        # careful: a plain 1.9 is a float to YAML\n",
    );
}

#[test]
fn kustomization_images_are_chosen_by_name() {
    let f = "kustomization.yaml";
    golden(
        f,
        "images.[name=registry.acme.io/shop/api-gateway].newTag",
        "2.15.0",
        12,
        "  newTag: 2.15.0\n",
    );
    golden(
        f,
        "images.[name=registry.acme.io/shop/checkout].newTag",
        "v3.4.0",
        15,
        "  newTag: \"v3.4.0\"\n",
    );
    golden(
        f,
        "images.[name=registry.acme.io/shop/catalog].digest",
        "sha256:1111111111111111111111111111111111111111111111111111111111111111",
        17,
        "  digest: sha256:1111111111111111111111111111111111111111111111111111111111111111\n",
    );
}

#[test]
fn multi_document_files_and_crlf_line_endings() {
    golden("multi-document.yaml", "app.image.tag", "v1.0.0", 7, "    tag: v1.0.0\n");
    golden(
        "windows-line-endings.yaml",
        "web.image.tag",
        "1.0.1",
        3,
        "    tag: \"1.0.1\" # CRLF line endings, as saved on Windows\r\n",
    );
}

#[test]
fn what_cannot_be_edited_safely_is_refused_with_the_reason() {
    let f = fixture("umbrella-values-prod.yaml");
    let cases = [
        (
            "api-gateway.image.tagg",
            "no tagg under api-gateway.image (keys there: repository, tag, pullPolicy)",
        ),
        ("global.presets.small.requests", "is in flow style"),
        ("checkout.resources", "is an alias"),
        ("checkout.env", "checkout.env is not a single value"),
        // The anchored preset is merged into another component too.
        (
            "global.presets.small.limits.memory",
            "would change more than global.presets.small.limits.memory",
        ),
        ("global.imageRegistry.host", "no host under global.imageRegistry"),
    ];
    for (path, expected) in cases {
        let err = set(&f, path, "x").unwrap_err();
        assert!(err.contains(expected), "{path}: {err}");
    }
}
