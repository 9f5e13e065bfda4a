//! The committed CRD YAML (in `crds/` and in the Helm chart) is exactly what the Rust
//! types generate; run `make generate` after changing crates/api.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["crds", "charts/siterecovery/crds"] {
        let stale = siterecovery_operator::crdgen::stale_files(&root.join(dir)).expect("rendering CRDs");
        assert!(stale.is_empty(), "stale generated CRDs, run `make generate`: {stale:?}");
    }
}

#[test]
fn every_kind_is_listed_with_status_and_category() {
    for crd in siterecovery_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["siterecovery".to_owned()][..]), "{name}");
        assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{name} has a short name");
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{name} has /status");
        let columns = version.additional_printer_columns.as_deref().unwrap_or_default();
        assert!(columns.iter().any(|c| c.name == "AGE"), "{name} prints AGE");
    }
}
