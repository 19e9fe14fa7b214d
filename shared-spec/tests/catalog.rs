//! The shipped catalog parses into exactly this spec (reviewers see semantic changes as diffs).

use duet_spec::{CATALOG, describe, parse_spec};

#[test]
fn catalog_listing() {
    let spec = parse_spec("catalog.toml", CATALOG).unwrap();
    insta::assert_snapshot!(describe(&spec));
}

#[test]
fn catalog_model() {
    let spec = parse_spec("catalog.toml", CATALOG).unwrap();
    insta::assert_json_snapshot!(spec);
}

#[test]
fn feature_fingerprints_separate_versions() {
    let spec = parse_spec("catalog.toml", CATALOG).unwrap();
    let (_, v1) = spec.feature("avg_txn_amount_30d_v1").unwrap();
    let (_, v2) = spec.feature("avg_txn_amount_30d_v2").unwrap();
    assert_ne!(v1.fingerprint(), v2.fingerprint());
    let again = parse_spec("catalog.toml", CATALOG).unwrap();
    assert_eq!(
        again
            .feature("avg_txn_amount_30d_v1")
            .unwrap()
            .1
            .fingerprint(),
        v1.fingerprint()
    );
}
