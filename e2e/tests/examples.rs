//! Every sample in `examples/` applies with `kubectl apply --server-side` and reads back
//! unchanged: the samples spell out every defaulted field, so nothing is added or lost.

use siterecovery_e2e::{TestNamespace, client, example_documents, install_crds, kubectl};

#[tokio::test]
async fn examples_apply_and_read_back_unchanged() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&client, "examples").await?;
    let docs = example_documents()?;
    assert!(docs.len() >= 5, "a policy, two servers, a plan and a failback job");
    for (path, doc) in &docs {
        let file = path.display();
        kubectl(&["apply", "--server-side", "-n", &ns.name, "-f", &path.to_string_lossy()], None)
            .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let kind = doc["kind"].as_str().unwrap_or_default().to_lowercase();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let got: serde_json::Value =
            serde_json::from_str(&kubectl(&["get", &kind, name, "-n", &ns.name, "-o", "json"], None)?)?;
        assert_eq!(got["spec"], doc["spec"], "{file}: {kind}/{name} spec changed on the way through the API server");
        if let Some(labels) = doc["metadata"]["labels"].as_object() {
            for (k, v) in labels {
                assert_eq!(&got["metadata"]["labels"][k], v, "{file}: label {k}");
            }
        }
        assert_eq!(got["apiVersion"], "siterecovery.io/v1alpha1");
    }
    Ok(())
}
