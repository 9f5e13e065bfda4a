//! `register`: hand a server's bootstrap token to its agent. Reads the Secret
//! `sr-bootstrap-<server>-token` (docs/agent-registration.md), writes the token and the
//! CA into a directory and prints the `siterecovery-agent register` command.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use siterecovery_api::ProtectedServer;

use crate::args::RegisterArgs;
use crate::client::{Kube, explain, status_code};

/// What the token Secret holds (decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// `srbt_…`.
    pub token: String,
    /// PEM of the operator CA that signs the registration endpoint.
    pub ca: String,
    /// Namespace and name of the server.
    pub namespace: String,
    /// Server name.
    pub server: String,
    /// RFC 3339 expiry.
    pub expires_at: Option<String>,
    /// A ready request body.
    pub request_json: Option<String>,
    /// The registration endpoint, when configured.
    pub url: Option<String>,
}

impl Bootstrap {
    /// Decodes the Secret's data; names the missing key otherwise.
    pub fn from_data(name: &str, data: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<Self> {
        let get = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(v).trim().to_owned()).filter(|v| !v.is_empty());
        let need =
            |k: &str| get(k).ok_or_else(|| anyhow!("Secret {name} has no {k:?}; it was not written by the operator"));
        Ok(Self {
            token: need("token")?,
            ca: need("ca.crt")?,
            namespace: need("namespace")?,
            server: need("server")?,
            expires_at: get("expiresAt"),
            request_json: get("request.json"),
            url: get("registrationURL"),
        })
    }
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn sh_quote(s: &str) -> String {
    let plain = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
    if plain { s.to_owned() } else { format!("'{}'", s.replace('\'', r"'\''")) }
}

/// The `siterecovery-agent register` arguments after the binary name; `dir` is where the
/// token and CA are (`"$here"` in the script).
pub fn register_args(
    b: &Bootstrap,
    url: &str,
    dir: &str,
    hostname: Option<&str>,
    disks: &[(String, String)],
) -> String {
    let mut words = vec![
        "--url".to_owned(),
        sh_quote(url),
        "--ca".into(),
        format!("{dir}/ca.crt"),
        "--namespace".into(),
        sh_quote(&b.namespace),
        "--server".into(),
        sh_quote(&b.server),
    ];
    if let Some(h) = hostname {
        words.extend(["--hostname".into(), sh_quote(h)]);
    }
    for (id, path) in disks {
        words.extend(["--disk".into(), sh_quote(&format!("{id}={path}"))]);
    }
    words.join(" ")
}

/// The one-line command printed to stdout (token read from the file, so it stays out of
/// the process list and the shell history).
pub fn command_line(
    b: &Bootstrap,
    url: &str,
    dir: &Path,
    hostname: Option<&str>,
    disks: &[(String, String)],
) -> String {
    let d = sh_quote(&dir.display().to_string());
    format!(
        "SR_BOOTSTRAP_TOKEN=\"$(cat {d}/token)\" siterecovery-agent register {}",
        register_args(b, url, &d, hostname, disks)
    )
}

/// `register.sh`, runnable from wherever the directory is copied to.
pub fn script(b: &Bootstrap, url: &str, hostname: Option<&str>, disks: &[(String, String)]) -> String {
    format!(
        "#!/bin/sh\n# Registers the agent of ProtectedServer {}/{} (run as root on that server).\nset -eu\n\
         here=$(cd \"$(dirname \"$0\")\" && pwd)\n\
         SR_BOOTSTRAP_TOKEN=\"$(cat \"$here/token\")\" exec siterecovery-agent register {} \"$@\"\n",
        b.namespace,
        b.server,
        register_args(b, url, "\"$here\"", hostname, disks)
    )
}

/// Runs `register`.
pub async fn run(kube: &Kube, args: &RegisterArgs) -> anyhow::Result<()> {
    let ns = &kube.namespace;
    let name = &args.server;
    let server = Api::<ProtectedServer>::namespaced(kube.client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| explain(e, "get", &format!("ProtectedServer {name}"), ns))?;
    let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), ns);
    let secret_name = format!("sr-bootstrap-{name}-token");
    let secret = match secrets.get_opt(&secret_name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(explain_missing(&secrets, name, ns).await),
        Err(e) => return Err(explain(e, "get", &format!("Secret {secret_name}"), ns)),
    };
    let data: BTreeMap<String, Vec<u8>> = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    let b = Bootstrap::from_data(&secret_name, &data)?;
    if let Some(exp) = b.expires_at.as_deref().and_then(|e| e.parse::<jiff::Timestamp>().ok())
        && exp <= jiff::Timestamp::now()
    {
        bail!(
            "the bootstrap token of {name} expired at {exp}; issue a new one with \
             kubectl delete secret sr-bootstrap-{name} -n {ns} and run this command again"
        );
    }
    let url = match args.url.clone().or(b.url.clone()) {
        Some(u) => u,
        None => {
            eprintln!(
                "note: Secret {secret_name} names no registrationURL; the command below has a placeholder: \
                 pass --url with the operator's registration endpoint (port 9444)"
            );
            "https://REGISTRATION-ENDPOINT:9444".into()
        }
    };
    let hostname = Some(server.spec.agent.hostname.as_str());
    let disks: Vec<(String, String)> = server.spec.disks.iter().map(|d| (d.id.clone(), d.path.clone())).collect();

    let dir = write_files(&args.out, &b, &url, hostname, &disks)?;
    eprintln!(
        "wrote {0}/token (0600), {0}/ca.crt, {0}/register.sh{1}; copy the directory to {2} over a channel you \
         trust and run register.sh there as root, or:",
        dir.display(),
        if b.request_json.is_some() { format!(", {}/request.json (0600)", dir.display()) } else { String::new() },
        server.spec.agent.hostname,
    );
    if let Some(exp) = &b.expires_at {
        eprintln!("the token is valid once, until {exp}");
    }
    println!("{}", command_line(&b, &url, &dir, hostname, &disks));
    Ok(())
}

fn write_files(
    out: &Path,
    b: &Bootstrap,
    url: &str,
    hostname: Option<&str>,
    disks: &[(String, String)],
) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", out.display()))?;
    let dir = out.canonicalize().with_context(|| format!("resolving {}", out.display()))?;
    write(&dir.join("token"), format!("{}\n", b.token).as_bytes(), 0o600)?;
    write(&dir.join("ca.crt"), b.ca.as_bytes(), 0o644)?;
    if let Some(req) = &b.request_json {
        write(&dir.join("request.json"), req.as_bytes(), 0o600)?;
    }
    write(&dir.join("register.sh"), script(b, url, hostname, disks).as_bytes(), 0o755)?;
    Ok(dir)
}

/// Writes a file with `mode`, also when it already exists with another one.
fn write(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(content).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Why there is no token Secret, from the state Secret `sr-bootstrap-<server>`.
async fn explain_missing(secrets: &Api<Secret>, server: &str, ns: &str) -> anyhow::Error {
    let state_name = format!("sr-bootstrap-{server}");
    let renew = format!("kubectl delete secret {state_name} -n {ns}");
    let state = match secrets.get_opt(&state_name).await {
        Ok(s) => s,
        Err(e) if status_code(&e) == Some(403) => return explain(e, "get", &format!("Secret {state_name}"), ns),
        Err(e) => return anyhow!(e).context(format!("reading Secret {state_name}")),
    };
    let Some(state) = state else {
        return anyhow!(
            "no bootstrap token has been issued for {server} yet: the operator issues one within seconds of the \
             ProtectedServer's creation; is siterecovery-operator running? (kubectl get events -n {ns} \
             --field-selector involvedObject.name={server})"
        );
    };
    let data: BTreeMap<String, String> = state
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).trim().to_owned()))
        .collect();
    missing_token_message(server, ns, &data, &renew)
}

/// The message for a used, expired or lost token, from the state Secret's data.
pub fn missing_token_message(server: &str, ns: &str, state: &BTreeMap<String, String>, renew: &str) -> anyhow::Error {
    let get = |k: &str| state.get(k).filter(|v| !v.is_empty()).cloned();
    if get("used").as_deref() == Some("true") {
        return anyhow!(
            "the bootstrap token of {server} was already used{}{} (the token Secret is deleted once used). \
             To register again (server reinstalled, credentials lost) issue a new token with `{renew}` \
             (this also revokes the registered agent's API token) and run this command again",
            get("usedAt").map(|t| format!(" at {t}")).unwrap_or_default(),
            get("usedByHostname").map(|h| format!(" by {h}")).unwrap_or_default(),
        );
    }
    let expired = get("expiresAt").filter(|e| e.parse::<jiff::Timestamp>().is_ok_and(|t| t <= jiff::Timestamp::now()));
    match expired {
        Some(at) => anyhow!(
            "the bootstrap token of {server} expired at {at} unused (its Secret is deleted on expiry); \
             issue a new one with `{renew}` and run this command again"
        ),
        None => anyhow!(
            "the token Secret sr-bootstrap-{server}-token is gone from namespace {ns} although the token is \
             unused; issue a new token with `{renew}` and run this command again"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap() -> Bootstrap {
        let data: BTreeMap<String, Vec<u8>> = [
            ("token", "srbt_abc"),
            ("ca.crt", "-----BEGIN CERTIFICATE-----\n"),
            ("namespace", "prod"),
            ("server", "db-01"),
            ("expiresAt", "2030-01-01T00:00:00Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
        .collect();
        Bootstrap::from_data("s", &data).unwrap()
    }

    #[test]
    fn the_command_reads_the_token_from_the_file() {
        let disks = vec![("os".to_owned(), "/dev/sda".to_owned()), ("data".into(), "/dev/disk/by-id/x y".into())];
        assert_eq!(
            command_line(&bootstrap(), "https://op:9444", Path::new("/tmp/reg"), Some("db-01.example.com"), &disks),
            "SR_BOOTSTRAP_TOKEN=\"$(cat /tmp/reg/token)\" siterecovery-agent register --url https://op:9444 \
             --ca /tmp/reg/ca.crt --namespace prod --server db-01 --hostname db-01.example.com \
             --disk os=/dev/sda --disk 'data=/dev/disk/by-id/x y'"
        );
        let script = script(&bootstrap(), "https://op:9444", None, &[]);
        assert!(script.contains(
            "SR_BOOTSTRAP_TOKEN=\"$(cat \"$here/token\")\" exec siterecovery-agent register --url https://op:9444 \
             --ca \"$here\"/ca.crt --namespace prod --server db-01 \"$@\""
        ));
    }

    #[test]
    fn missing_keys_are_named() {
        let err = Bootstrap::from_data("sr-bootstrap-x-token", &BTreeMap::new()).unwrap_err().to_string();
        assert_eq!(err, "Secret sr-bootstrap-x-token has no \"token\"; it was not written by the operator");
    }

    #[test]
    fn a_used_or_expired_token_says_how_to_get_a_new_one() {
        let renew = "kubectl delete secret sr-bootstrap-db-01 -n prod";
        let used: BTreeMap<String, String> =
            [("used", "true"), ("usedAt", "2026-03-01T09:00:00Z"), ("usedByHostname", "db-01")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect();
        let msg = missing_token_message("db-01", "prod", &used, renew).to_string();
        assert!(
            msg.starts_with("the bootstrap token of db-01 was already used at 2026-03-01T09:00:00Z by db-01"),
            "{msg}"
        );
        assert!(msg.contains(renew), "{msg}");
        let expired: BTreeMap<String, String> = [("used", "false"), ("expiresAt", "2020-01-01T00:00:00Z")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let msg = missing_token_message("db-01", "prod", &expired, renew).to_string();
        assert!(msg.contains("expired at 2020-01-01T00:00:00Z unused"), "{msg}");
    }
}
