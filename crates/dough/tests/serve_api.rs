//! Unit tier: `dough serve`'s OpenAPI document, checked by a validator
//! from a registry (openapi-spec-validator from PyPI; scripts/test
//! installs it and sets DOUGH_OPENAPI_VALIDATOR).

use std::process::Command;

#[test]
fn the_openapi_document_validates() {
    let out = Command::new(env!("CARGO_BIN_EXE_dough"))
        .args(["serve", "--openapi"])
        .env("DOUGH_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["info"]["title"], "dough");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, &out.stdout).unwrap();
    let validator = std::env::var("DOUGH_OPENAPI_VALIDATOR").expect(
        "DOUGH_OPENAPI_VALIDATOR is not set: run the suite with scripts/test, \
         which installs openapi-spec-validator",
    );
    let v = Command::new(&validator)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{validator}: {e}"));
    let said =
        String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
    assert!(
        v.status.success(),
        "the OpenAPI document does not validate:\n{said}"
    );
    assert!(said.contains(": OK"), "{said}");
}

/// The validator really checks: a document with an error is refused (so
/// the test above cannot pass by a validator that accepts anything).
#[test]
fn the_validator_refuses_a_broken_document() {
    let Ok(validator) = std::env::var("DOUGH_OPENAPI_VALIDATOR") else {
        panic!("DOUGH_OPENAPI_VALIDATOR is not set: run the suite with scripts/test");
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.json");
    std::fs::write(
        &path,
        r##"{"openapi":"3.1.0","info":{"title":"x","version":"1"},"paths":{"/a":{"get":{"responses":{"200":{"$ref":"#/components/responses/Nope"}}}}}}"##,
    )
    .unwrap();
    let v = Command::new(&validator).arg(&path).output().unwrap();
    assert!(
        !v.status.success(),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
}
