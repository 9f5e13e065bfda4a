//! The objects of one namespace's process-server fleet: a StatefulSet (one pod and one
//! cache volume per process server) and the headless Service that gives each pod the
//! stable DNS name agents connect to. Pure builders, no client.
//!
//! Neither object has an owner reference: the fleet serves every ProtectedServer of the
//! namespace, so no single server can own it (garbage collection would remove it, and
//! cut replication for all the others, when that one server is deleted), and listing
//! every server as an owner would rewrite the StatefulSet on each new server. The
//! labels below identify them instead; the operator removes them after the last server
//! of the namespace is gone, and namespace deletion removes them otherwise.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::ProcessServerConfig;
use crate::registration::{PROCESS_SERVER_SERVICE, PROCESS_SERVER_TLS_SECRET};

/// Name of the StatefulSet and of the headless Service; pods are `<NAME>-<ordinal>`.
/// Registration issues the process servers' certificate for this Service name.
pub const NAME: &str = PROCESS_SERVER_SERVICE;
/// `app.kubernetes.io/component` of the process-server pods, their StatefulSet and Service,
/// and the heartbeat Leases.
pub const COMPONENT: &str = "process-server";
/// Label selector of the heartbeat Leases.
pub const LEASE_SELECTOR: &str = "app.kubernetes.io/component=process-server";
/// Label selector of the StatefulSets (and Services) this module manages.
pub const FLEET_SELECTOR: &str =
    "app.kubernetes.io/component=process-server,app.kubernetes.io/managed-by=siterecovery-operator";
/// Annotation on the StatefulSet holding each process server's last health level, so a
/// change is noticed (and announced once) across operator restarts.
pub const HEALTH_ANNOTATION: &str = "siterecovery.io/process-server-health";
/// Name of the cache volume (claim template) and where it is mounted.
pub const CACHE_VOLUME: &str = "cache";
/// Mount path of the cache volume, also passed as `SR_CACHE_DIR`.
pub const CACHE_DIR: &str = "/var/cache/siterecovery";
/// Where the serving certificate Secret (issued by `crate::registration`) is mounted,
/// also passed as `SR_TLS_DIR`.
pub const TLS_DIR: &str = "/etc/siterecovery/tls";
/// Name of the replication port on the container and the Service.
pub const PORT_NAME: &str = "replication";
/// Pod label the AKS workload-identity webhook acts on (projects the token, sets
/// `AZURE_FEDERATED_TOKEN_FILE` and `AZURE_AUTHORITY_HOST`).
pub const WORKLOAD_IDENTITY_USE: &str = "azure.workload.identity/use";
/// ServiceAccount annotation naming the Entra application of workload identity.
pub const WORKLOAD_IDENTITY_CLIENT_ID: &str = "azure.workload.identity/client-id";
/// The non-root user and group the process server runs as (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;

/// Labels selecting the pods (immutable in the StatefulSet: never change them).
pub fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), NAME.to_owned()),
        ("app.kubernetes.io/component".to_owned(), COMPONENT.to_owned()),
    ])
}

/// Labels of every fleet object: the selector labels, plus who manages it.
pub fn labels() -> BTreeMap<String, String> {
    let mut labels = selector_labels();
    labels.insert("app.kubernetes.io/part-of".to_owned(), "siterecovery".to_owned());
    labels.insert("app.kubernetes.io/managed-by".to_owned(), siterecovery_api::field_manager::OPERATOR.to_owned());
    labels
}

/// Pod name of the process server with this ordinal.
pub fn pod_name(ordinal: u32) -> String {
    format!("{NAME}-{ordinal}")
}

/// Ordinal of a process-server pod name of this fleet; `None` for any other name.
pub fn ordinal(pod: &str) -> Option<u32> {
    let digits = pod.strip_prefix(NAME)?.strip_prefix('-')?;
    let canonical = digits.chars().all(|c| c.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    if canonical { digits.parse().ok() } else { None }
}

/// The fleet's StatefulSet. `claim_templates` are the existing StatefulSet's volume claim
/// templates when there is one: Kubernetes refuses to change them, so a new cache size or
/// StorageClass applies only to a fleet created afterwards.
pub fn stateful_set(
    namespace: &str,
    config: &ProcessServerConfig,
    replicas: u32,
    health_annotation: String,
    claim_templates: Option<Vec<PersistentVolumeClaim>>,
) -> StatefulSet {
    StatefulSet {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels()),
            annotations: Some(BTreeMap::from([(HEALTH_ANNOTATION.to_owned(), health_annotation)])),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            service_name: Some(NAME.to_owned()),
            selector: LabelSelector { match_labels: Some(selector_labels()), ..Default::default() },
            // Process servers are independent: start and stop them all at once.
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                ..Default::default()
            }),
            // A cache may hold acknowledged data not yet uploaded: never delete it with the
            // pod. A process server scaled back up finds its cache and finishes the upload.
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".to_owned()),
                when_scaled: Some("Retain".to_owned()),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(pod_labels(config)), ..Default::default() }),
                spec: Some(pod_spec(config)),
            },
            volume_claim_templates: Some(claim_templates.unwrap_or_else(|| vec![cache_claim(config)])),
            ..Default::default()
        }),
        status: None,
    }
}

/// Labels of the pods: the fleet's, and the workload-identity webhook's when configured
/// (not in the selector, which cannot change).
fn pod_labels(config: &ProcessServerConfig) -> BTreeMap<String, String> {
    let mut labels = labels();
    if config.workload_identity {
        labels.insert(WORKLOAD_IDENTITY_USE.to_owned(), "true".to_owned());
    }
    labels
}

/// The cache volume claim template built from the configuration.
pub fn cache_claim(config: &ProcessServerConfig) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta { name: Some(CACHE_VOLUME.to_owned()), labels: Some(labels()), ..Default::default() },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: config.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(config.cache_size.clone()))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// `(size, storageClass)` of a cache claim template, for comparing an existing fleet with
/// the configuration.
pub fn cache_settings(claim: &PersistentVolumeClaim) -> (Option<String>, Option<String>) {
    let spec = claim.spec.as_ref();
    let size = spec
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone());
    (size, spec.and_then(|s| s.storage_class_name.clone()))
}

fn pod_spec(config: &ProcessServerConfig) -> PodSpec {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector { field_path: path.to_owned(), ..Default::default() }),
        ..Default::default()
    };
    let env = vec![
        EnvVar { name: "POD_NAME".into(), value_from: Some(field("metadata.name")), ..Default::default() },
        EnvVar { name: "POD_NAMESPACE".into(), value_from: Some(field("metadata.namespace")), ..Default::default() },
        EnvVar { name: "SR_LISTEN_PORT".into(), value: Some(config.port.to_string()), ..Default::default() },
        EnvVar { name: "SR_CACHE_DIR".into(), value: Some(CACHE_DIR.into()), ..Default::default() },
        EnvVar { name: "SR_TLS_DIR".into(), value: Some(TLS_DIR.into()), ..Default::default() },
    ];
    let mut limits = BTreeMap::new();
    if let Some(memory) = &config.memory_limit {
        limits.insert("memory".to_owned(), Quantity(memory.clone()));
    }
    let container = Container {
        name: COMPONENT.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        args: (!config.args.is_empty()).then(|| config.args.clone()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.to_owned()),
            container_port: i32::from(config.port),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity(config.cpu_request.clone())),
                ("memory".to_owned(), Quantity(config.memory_request.clone())),
            ])),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::String(PORT_NAME.to_owned()), host: None }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount { name: CACHE_VOLUME.to_owned(), mount_path: CACHE_DIR.to_owned(), ..Default::default() },
            VolumeMount {
                name: "tls".to_owned(),
                mount_path: TLS_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            // The root filesystem is read-only; scratch space for the runtime.
            VolumeMount { name: "tmp".to_owned(), mount_path: "/tmp".to_owned(), ..Default::default() },
        ]),
        ..Default::default()
    };
    PodSpec {
        containers: vec![container],
        service_account_name: pod_service_account(config),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), ..Default::default() }),
            ..Default::default()
        }),
        // Time to finish the batches in flight and make them durable in the cache.
        termination_grace_period_seconds: Some(60),
        volumes: Some(vec![
            // The serving certificate (SANs: this Service and its pods) that agents verify;
            // not optional: a process server never serves without it.
            Volume {
                name: "tls".to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(PROCESS_SERVER_TLS_SECRET.to_owned()),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Volume { name: "tmp".to_owned(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
        ]),
        ..Default::default()
    }
}

/// The headless Service: `<pod>.siterecovery-process-server.<namespace>.svc` resolves to
/// one process server, which is what an agent assigned to it connects to.
pub fn service(namespace: &str, config: &ProcessServerConfig) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels()),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                port: i32::from(config.port),
                target_port: Some(IntOrString::String(PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The ServiceAccount the pods run as: the user's, or the one the operator manages when
/// a ClusterRole is configured, or none (the namespace's `default`).
pub fn pod_service_account(config: &ProcessServerConfig) -> Option<String> {
    config.service_account.clone().or_else(|| config.cluster_role.as_ref().map(|_| NAME.to_owned()))
}

/// The operator-managed identity of the process servers in `namespace`: a ServiceAccount
/// and a RoleBinding to the configured ClusterRole (heartbeat Leases, their servers'
/// status, events). `None` when the user manages the identity.
pub fn identity(
    namespace: &str,
    config: &ProcessServerConfig,
) -> Option<(k8s_openapi::api::core::v1::ServiceAccount, k8s_openapi::api::rbac::v1::RoleBinding)> {
    use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
    if config.service_account.is_some() {
        return None;
    }
    let cluster_role = config.cluster_role.clone()?;
    let meta = ObjectMeta {
        name: Some(NAME.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels()),
        ..Default::default()
    };
    let mut account_meta = meta.clone();
    account_meta.annotations = config
        .workload_identity_client_id
        .as_ref()
        .map(|id| BTreeMap::from([(WORKLOAD_IDENTITY_CLIENT_ID.to_owned(), id.clone())]));
    let account = k8s_openapi::api::core::v1::ServiceAccount { metadata: account_meta, ..Default::default() };
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: cluster_role,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: NAME.to_owned(),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        }]),
    };
    Some((account, binding))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_identity_labels_the_pods_and_annotates_the_managed_account() {
        let plain = ProcessServerConfig { cluster_role: Some("sr-process-server".into()), ..Default::default() };
        let set = stateful_set("dr", &plain, 1, String::new(), None);
        let template_labels = set.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        assert!(!template_labels.contains_key(WORKLOAD_IDENTITY_USE));
        assert!(identity("dr", &plain).unwrap().0.metadata.annotations.is_none());

        let wi = ProcessServerConfig {
            workload_identity: true,
            workload_identity_client_id: Some("6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
            ..plain
        };
        let spec = stateful_set("dr", &wi, 1, String::new(), None).spec.unwrap();
        let template_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(template_labels[WORKLOAD_IDENTITY_USE], "true");
        assert_eq!(spec.selector.match_labels.unwrap(), selector_labels(), "the selector never changes");
        let (account, _) = identity("dr", &wi).unwrap();
        assert_eq!(
            account.metadata.annotations.unwrap()[WORKLOAD_IDENTITY_CLIENT_ID],
            "6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
        );
    }
}
