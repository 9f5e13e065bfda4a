//! Schema helpers for fields whose contents another API validates.

use schemars::{Schema, SchemaGenerator, json_schema};

/// An object whose fields are kept as written (`x-kubernetes-preserve-unknown-fields`).
///
/// Used for embedded Job specs: inlining the full pod schema would add ~300 KiB to
/// the CRD (too large for client-side `kubectl apply`), and the API server validates
/// the Job itself when the operator dry-runs it.
pub fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
