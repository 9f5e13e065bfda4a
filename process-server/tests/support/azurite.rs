//! A private Azurite (the npm emulator) for one test, started by `hack/azurite.sh` on a
//! port and state directory of the test's own, so it can be killed and started again on
//! the same port over the same data.

use std::path::{Path, PathBuf};
use std::process::Command;

use siterecovery_store::AccountSas;
use siterecovery_store::backend::{DEVSTORE_ACCOUNT, DEVSTORE_KEY};

/// One Azurite process (`azurite-blob --location <dir>/data`), stopped when dropped.
pub struct Azurite {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its state directory (data, log and pid file).
    pub dir: PathBuf,
}

impl Azurite {
    /// Starts Azurite on `port` with its state in `dir` (installed once from npm by the
    /// script if missing) and waits until it answers.
    pub async fn start(dir: &Path, port: u16) -> Self {
        let a = Self { port, dir: dir.to_path_buf() };
        a.script("up").await;
        a
    }

    /// Starts it again on the same port over the same data directory.
    pub async fn restart(&self) {
        self.script("up").await;
    }

    /// SIGKILLs the node process (its whole process group: the script starts it with
    /// `setsid`) and waits until it is gone: no shutdown handler runs, so nothing is saved
    /// on the way out.
    pub fn kill9(&self) {
        let pid = self.pid().expect("Azurite is running");
        let status = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status().unwrap();
        assert!(status.success(), "kill -KILL -{pid} failed");
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("Azurite (pid {pid}) survived SIGKILL");
    }

    /// The running node process, from the script's pid file.
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("azurite.pid")).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// The account endpoint (Azurite's well-known development account, path-style).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/devstoreaccount1", self.port)
    }

    /// An account SAS for the development account, valid for a day.
    pub fn sas() -> String {
        let expiry = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
        AccountSas::full_access(DEVSTORE_ACCOUNT, expiry).sign(DEVSTORE_KEY).unwrap()
    }

    /// The end of Azurite's log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read(self.dir.join("azurite.log")).unwrap_or_default();
        String::from_utf8_lossy(&text[text.len().saturating_sub(4000)..]).into_owned()
    }

    async fn script(&self, verb: &'static str) {
        let mut cmd = self.command(verb);
        let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
        assert!(
            out.status.success(),
            "hack/azurite.sh {verb} (port {}, {}) failed: {}",
            self.port,
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn command(&self, verb: &str) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/azurite.sh");
        let mut cmd = Command::new(script);
        cmd.arg(verb).env("SR_AZURITE_PORT", self.port.to_string()).env("SR_AZURITE_DIR", &self.dir);
        cmd
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.command("down").output();
    }
}
