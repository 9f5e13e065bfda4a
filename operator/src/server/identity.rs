//! The agent's identity in the cluster: a ServiceAccount whose Role lets it read only
//! its own ProtectedServer and patch only that object's status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use siterecovery_api::ProtectedServer;

/// Label naming the ProtectedServer a child object belongs to.
pub const SERVER_LABEL: &str = "siterecovery.io/protected-server";

/// Name of the agent's ServiceAccount, Role and RoleBinding.
pub fn agent_name(server: &ProtectedServer) -> String {
    // Object names are at most 253 characters; keep room for the prefix.
    let name = server.name_any();
    let short: String = name.chars().take(240).collect();
    format!("sr-agent-{short}")
}

fn meta(server: &ProtectedServer) -> ObjectMeta {
    ObjectMeta {
        name: Some(agent_name(server)),
        namespace: server.namespace(),
        labels: Some(BTreeMap::from([
            (SERVER_LABEL.to_owned(), server.name_any()),
            ("app.kubernetes.io/component".to_owned(), "agent".to_owned()),
            ("app.kubernetes.io/managed-by".to_owned(), "siterecovery-operator".to_owned()),
        ])),
        owner_references: server.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The agent's ServiceAccount.
pub fn service_account(server: &ProtectedServer) -> ServiceAccount {
    ServiceAccount { metadata: meta(server), automount_service_account_token: Some(false), ..Default::default() }
}

/// Read its own ProtectedServer; patch its own status. Nothing else.
pub fn role(server: &ProtectedServer) -> Role {
    let only = Some(vec![server.name_any()]);
    let group = Some(vec![siterecovery_api::GROUP.to_owned()]);
    Role {
        metadata: meta(server),
        rules: Some(vec![
            PolicyRule {
                api_groups: group.clone(),
                resources: Some(vec!["protectedservers".into()]),
                resource_names: only.clone(),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..Default::default()
            },
            PolicyRule {
                api_groups: group,
                resources: Some(vec!["protectedservers/status".into()]),
                resource_names: only,
                verbs: vec!["get".into(), "patch".into()],
                ..Default::default()
            },
        ]),
    }
}

/// Binds the Role to the ServiceAccount.
pub fn role_binding(server: &ProtectedServer) -> RoleBinding {
    let name = agent_name(server);
    RoleBinding {
        metadata: meta(server),
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.clone() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: server.namespace(),
            ..Default::default()
        }]),
    }
}
