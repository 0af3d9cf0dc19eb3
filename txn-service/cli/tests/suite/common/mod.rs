//! Shared harness for the CLI suites: a `writ server run` child process on temp paths.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) mod dev;

pub(crate) const WRIT: &str = env!("CARGO_BIN_EXE_writ");

/// A `writ server run` child process on a temp data dir, killed on drop.
pub(crate) struct Server {
    pub(crate) node_addr: String,
    pub(crate) child: Child,
    pub(crate) dir: tempfile::TempDir,
}

impl Server {
    pub(crate) fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts a server whose `server.toml` holds `config` (data dir and socket are set by
    /// flags).
    pub(crate) fn start_with_config(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.toml"), config).unwrap();
        let (child, node_addr) = Self::spawn_on_free_port(dir.path());
        let server = Self {
            node_addr,
            child,
            dir,
        };
        server.wait_ready();
        server
    }

    /// Starts a server on port 0 and returns it with the node API address it reports.
    pub(crate) fn spawn_on_free_port(dir: &Path) -> (Child, String) {
        let mut child = Self::command(dir, "127.0.0.1:0")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let addr = bound_address(stderr, "node API (mTLS) ready");
        (child, addr)
    }

    /// Starts a server on `node_addr` (a restart keeps its own address).
    pub(crate) fn spawn(dir: &Path, node_addr: &str) -> Child {
        Self::command(dir, node_addr).spawn().unwrap()
    }

    fn command(dir: &Path, node_addr: &str) -> Command {
        let mut command = Command::new(WRIT);
        command
            .args(["server", "run", "--config"])
            .arg(dir.join("server.toml"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--server-socket")
            .arg(dir.join("server.sock"))
            .args(["--bind-address", node_addr])
            .env_remove("WRIT_SERVER_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("server.sock")
    }

    pub(crate) fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.socket().exists() && self.writ(&["healthcheck", "--shallow"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not become ready");
    }

    pub(crate) fn restart(&mut self) {
        // SIGTERM, as systemd would send, then start again on the same data dir.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        self.child = Self::spawn(self.dir.path(), &self.node_addr);
        self.wait_ready();
    }

    pub(crate) fn writ(&self, args: &[&str]) -> Output {
        Command::new(WRIT)
            .args(args)
            .env("WRIT_SERVER_SOCKET", self.socket())
            .output()
            .unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.writ(args);
        assert!(
            out.status.success(),
            "writ {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; returns its stderr: one line, or for a usage error
    /// (exit 2) clap's reason on the first line followed by its tips.
    pub(crate) fn fails(&self, args: &[&str]) -> String {
        let out = self.writ(args);
        assert!(!out.status.success(), "writ {args:?} should have failed");
        let err = String::from_utf8(out.stderr).unwrap();
        if out.status.code() != Some(2) {
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "one-line reason, got {err:?}"
            );
        }
        assert!(err.starts_with("error: "), "got {err:?}");
        err
    }

    pub(crate) fn entry_count(&self) -> usize {
        let list: serde_json::Value =
            serde_json::from_str(&self.ok(&["entry", "list", "--output", "json"])).unwrap();
        // A list is always an array, also for one entry.
        list.as_array().expect("entry list prints an array").len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `writ agent run` child process, killed on drop.
pub(crate) struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `writ agent run` with a join token and the server's bundle on temp paths.
pub(crate) fn agent_cmd(
    server: &Server,
    token: &str,
    data: &Path,
    socket: &Path,
    bundle: &Path,
) -> Command {
    let mut cmd = Command::new(WRIT);
    cmd.args([
        "agent",
        "run",
        "--join-token",
        token,
        "--server-address",
        &server.node_addr,
    ])
    .arg("--trust-bundle")
    .arg(bundle)
    .arg("--data-dir")
    .arg(data)
    .arg("--socket-path")
    .arg(socket)
    .env_remove("SPIFFE_ENDPOINT_SOCKET");
    cmd
}

pub(crate) use writ_tests::uid;

/// Runs `writ` with `SPIFFE_ENDPOINT_SOCKET` pointing at `socket`.
pub(crate) fn api(args: &[&str], socket: &Path) -> std::process::Output {
    Command::new(WRIT)
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .unwrap()
}

/// Generates a join token for a new agent and writes the server's bundle to
/// `<data dir>/bundle.pem` for it to bootstrap with. Returns the token.
pub(crate) fn join_token_and_bundle(server: &Server) -> String {
    let token = server
        .ok(&["token", "generate"])
        .trim()
        .strip_prefix("Token: ")
        .unwrap()
        .to_owned();
    let bundle = server.dir.path().join("bundle.pem");
    std::fs::write(bundle, server.ok(&["bundle", "show"])).unwrap();
    token
}

/// Generates a join token, starts an agent with it and waits until its Workload API
/// answers. Returns the agent, its socket and its SPIFFE ID.
pub(crate) fn start_agent(server: &Server) -> (Agent, PathBuf, String) {
    let dir = server.dir.path();
    let token = join_token_and_bundle(server);
    let socket = dir.join("agent.sock");
    let agent = Agent(
        agent_cmd(
            server,
            &token,
            &dir.join("agent"),
            &socket,
            &dir.join("bundle.pem"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let endpoint = format!("unix://{}", socket.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api(
        &["healthcheck", "--shallow", "--socket", &endpoint],
        &socket,
    )
    .status
    .success()
    {
        assert!(Instant::now() < deadline, "agent did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = format!("spiffe://example.org/writ/agent/join_token/{token}");
    (agent, socket, id)
}

pub(crate) fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Reads a child's output (standard error or out) on a thread until a line containing `marker` names
/// the address it bound (a `127.0.0.1:<port>` in that line), and returns it; the rest
/// of the output is drained so the child never blocks on a full pipe. Servers in these
/// tests bind port 0 and report what they got: no port is picked, released and reused.
pub(crate) fn bound_address(
    output: impl std::io::Read + Send + 'static,
    marker: &'static str,
) -> String {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if line.contains(marker)
                && let Some(addr) = loopback_address(&line)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no {marker:?} line with a bound address"))
}

/// The first `127.0.0.1:<port>` in `line` (ANSI colour codes around it are ignored).
fn loopback_address(line: &str) -> Option<String> {
    let start = line.find("127.0.0.1:")?;
    let rest = &line[start + "127.0.0.1:".len()..];
    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!port.is_empty()).then(|| format!("127.0.0.1:{port}"))
}
