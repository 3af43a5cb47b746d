//! The real executables: building them, a `quipd serve` process, and `quip` runs.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use quip_client::{Client, ClientConfig};
use quipd::admin::{AdminRequest, AdminResponse};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::server::ca_path;
use crate::{temp_dir, within, within_for, workspace_root, BULK, STEP};

/// Paths of the `quipd` and `quip` executables.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub quipd: PathBuf,
    pub quip: PathBuf,
}

/// The executables, built once per test process with
/// `cargo build -p quipd -p quip-client --bins` (debug profile, like the tests).
///
/// Blocks while cargo runs (and while another build holds cargo's lock); from async code use
/// [`Binaries::get`].
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(build_binaries)
}

impl Binaries {
    /// [`binaries`], without blocking the async runtime.
    pub async fn get() -> &'static Binaries {
        tokio::task::spawn_blocking(binaries)
            .await
            .expect("building the binaries panicked")
    }
}

fn build_binaries() -> Binaries {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let mut command = std::process::Command::new(&cargo);
    // Cargo runs tests with variables describing the test crate. Build scripts that watch them
    // (ring's watches CARGO_PKG_NAME and CARGO_MANIFEST_DIR) would see them change and rebuild
    // here, and again in the next `cargo test`: the nested build gets the environment a
    // `cargo` typed in the shell would.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_for_the_test = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_EXE_",
            "CARGO_CFG_",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&key);
        if set_by_cargo_for_the_test {
            command.env_remove(key);
        }
    }
    let output = command
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "quipd",
            "-p",
            "quip-client",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cargo:?} build in {}: {e}", root.display()));
    assert!(
        output.status.success(),
        "`cargo build -p quipd -p quip-client --bins` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // Cargo names each executable it built (or found fresh); that also honours a target
    // directory set in cargo's config. Fall back to CARGO_TARGET_DIR or <root>/target.
    let mut built = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            built.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let mut find = |name: &str| {
        let path = built.remove(name).unwrap_or_else(|| {
            target_dir
                .join("debug")
                .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
        });
        assert!(
            path.is_file(),
            "cargo built {name} but {} does not exist",
            path.display()
        );
        path
    };
    Binaries {
        quipd: find("quipd"),
        quip: find("quip"),
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago (bound, read, released).
pub fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("binding a UDP socket on 127.0.0.1:0");
    socket
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, read, released).
pub fn free_tcp_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("binding a TCP socket on 127.0.0.1:0");
    listener
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

/// The samples of a Prometheus endpoint (`GET /metrics`), by series (name and labels).
pub async fn scrape_metrics(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("asking for /metrics");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("reading /metrics");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A `quipd serve` process on its own temporary data directory. SIGKILLed when dropped.
#[derive(Debug)]
pub struct DaemonProcess {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    addr: SocketAddr,
    child: Option<std::process::Child>,
    /// Processes started so far; each writes its own log file.
    starts: u32,
    /// A configuration file given with `--config`, if any.
    config: Option<PathBuf>,
    /// The largest file the daemon may write, in KiB (`ulimit -f`), if limited.
    file_size_limit_kib: Option<u64>,
}

impl DaemonProcess {
    /// Starts `quipd serve --data DIR --listen 127.0.0.1:PORT` on a fresh directory and waits
    /// until it serves.
    pub async fn start() -> DaemonProcess {
        Self::start_with(None).await
    }

    /// Like [`DaemonProcess::start`], with this configuration file (TOML) as `--config`; the
    /// flags still set the data directory and the address.
    pub async fn start_with_config(toml: &str) -> DaemonProcess {
        Self::start_with(Some(toml)).await
    }

    /// Like [`DaemonProcess::start_with_config`], with the size of every file the daemon writes
    /// limited to about `kib` KiB (`ulimit -f`, SIGXFSZ ignored): a write past it fails with
    /// `EFBIG`, a real IO failure of the store on a real disk.
    pub async fn start_with_file_size_limit(toml: &str, kib: u64) -> DaemonProcess {
        Self::start_full(None, Some(toml), Some(kib)).await
    }

    async fn start_with(toml: Option<&str>) -> DaemonProcess {
        Self::start_full(None, toml, None).await
    }

    /// Like [`DaemonProcess::start_with_config`], with the data directory at `data_dir` (on a
    /// filesystem of the test's choosing) rather than in the daemon's temporary directory.
    pub async fn start_on(data_dir: Option<PathBuf>, toml: Option<&str>) -> DaemonProcess {
        Self::start_full(data_dir, toml, None).await
    }

    async fn start_full(
        data_dir: Option<PathBuf>,
        toml: Option<&str>,
        file_size_limit_kib: Option<u64>,
    ) -> DaemonProcess {
        let dir = temp_dir();
        let data_dir = data_dir.unwrap_or_else(|| dir.path().join("data"));
        let config = toml.map(|toml| {
            let path = dir.path().join("quipd.toml");
            std::fs::write(&path, toml).expect("writing the quipd configuration");
            path
        });
        let mut daemon = DaemonProcess {
            dir,
            data_dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: None,
            starts: 0,
            config,
            file_size_limit_kib,
        };
        daemon.spawn_ready(free_udp_port()).await;
        daemon
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn ca_path(&self) -> PathBuf {
        ca_path(&self.data_dir)
    }

    /// The process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is not running").id()
    }

    /// Waits (at most `limit`) for the daemon to exit on its own, and reaps it.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("the daemon is not running");
            if let Some(status) = child.try_wait().expect("polling quipd") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "quipd did not exit within {limit:?}; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the daemon and reaps it. No shutdown code runs.
    pub fn kill9(&mut self) {
        let mut child = self
            .child
            .take()
            .expect("kill9 on a daemon that is not running");
        child.kill().expect("sending SIGKILL to quipd");
        let status = child.wait().expect("reaping quipd");
        assert!(
            !status.success(),
            "quipd exited successfully instead of being killed"
        );
    }

    /// Starts the daemon again on the same data directory and port (SIGKILLing it first if it
    /// still runs), and waits until it serves.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn_ready(self.addr.port()).await;
    }

    /// The log of the process started `back` starts before the current one (0: the current).
    pub fn earlier_log(&self, back: u32) -> String {
        let path = self
            .dir
            .path()
            .join(format!("quipd-{}.log", self.starts - back));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The log (stderr) of the current or last process.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("quipd-{}.log", self.starts))
    }

    async fn spawn_ready(&mut self, mut port: u16) {
        let bins = Binaries::get().await;
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            self.starts += 1;
            self.addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = std::fs::File::create(self.log_path()).expect("creating the quipd log");
            let mut command = match self.file_size_limit_kib {
                // The shell sets the limit and ignores the signal, then becomes quipd.
                Some(kib) => {
                    let mut shell = std::process::Command::new("sh");
                    shell
                        .arg("-c")
                        .arg(format!(
                            "trap '' XFSZ; ulimit -f {}; exec \"$0\" \"$@\"",
                            kib * 2
                        ))
                        .arg(&bins.quipd);
                    shell
                }
                None => std::process::Command::new(&bins.quipd),
            };
            command.arg("serve");
            if let Some(config) = &self.config {
                command.arg("--config").arg(config);
            }
            let child = command
                .arg("--data")
                .arg(&self.data_dir)
                .arg("--listen")
                .arg(self.addr.to_string())
                .env("RUST_BACKTRACE", "1")
                .env_remove("QUIPD_DATA")
                .env_remove("QUIPD_LISTEN")
                .env_remove("QUIPD_CONFIG")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("cloning the log file handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", bins.quipd.display()));
            self.child = Some(child);
            match self.wait_ready().await {
                Ok(()) => return,
                Err(status) => {
                    let log = self.log();
                    // Another test may have taken the port between our probe and the bind.
                    if log.contains("binding UDP") && attempt < ATTEMPTS {
                        port = free_udp_port();
                        continue;
                    }
                    panic!(
                        "quipd serve on {} exited during start-up ({status}); its log:\n{log}",
                        self.addr
                    );
                }
            }
        }
    }

    /// Polls until the CA exists and the admin socket answers, or the process exits.
    async fn wait_ready(&mut self) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + STEP;
        let ca = self.ca_path();
        loop {
            let child = self.child.as_mut().expect("the daemon was just spawned");
            if let Some(status) = child.try_wait().expect("polling quipd") {
                self.child = None;
                return Err(status);
            }
            if ca.is_file() && admin_answers(&self.data_dir).await {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "quipd on {} was not ready after {STEP:?}; its log:\n{}",
                self.addr,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `quipd user add NAME --data DIR`; returns the token it prints.
    pub async fn add_user(&self, name: &str) -> String {
        let bins = Binaries::get().await;
        let mut command = tokio::process::Command::new(&bins.quipd);
        command
            .args(["user", "add", name, "--data"])
            .arg(&self.data_dir)
            .env_remove("QUIPD_DATA")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = within(format_args!("quipd user add {name}"), command.output())
            .await
            .expect("running quipd user add");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "quipd user add {name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let token = stdout.trim().to_owned();
        assert!(
            token.starts_with("quip_") && !token.contains(char::is_whitespace),
            "quipd user add {name} printed {stdout:?}, not one token"
        );
        token
    }

    /// An SDK client of this daemon.
    pub async fn client(&self, token: &str) -> Client {
        let config = ClientConfig::from_ca_file(self.addr.to_string(), self.ca_path(), token)
            .unwrap_or_else(|e| panic!("reading the daemon's CA: {e}"));
        within(
            format_args!("connecting to quipd at {}", self.addr),
            Client::connect(config),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connecting to quipd at {}: {e}; its log:\n{}",
                self.addr,
                self.log()
            )
        })
    }

    /// `quip` as the user of `token`, talking to this daemon.
    pub async fn quip(&self, token: &str) -> Quip {
        Quip::new(self.addr.to_string(), self.ca_path(), Some(token)).await
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the daemon's admin socket answers a `user_list` request. Speaks the socket's JSON
/// lines itself: `quipd::admin::run` would open the store directly when the socket refuses (as a
/// stale one left by a killed daemon does), racing the daemon that is starting.
async fn admin_answers(data_dir: &Path) -> bool {
    let socket = quipd::server::admin_socket(data_dir);
    let ask = async {
        let stream = tokio::net::UnixStream::connect(&socket).await.ok()?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(&AdminRequest::UserList).ok()?;
        line.push(b'\n');
        write.write_all(&line).await.ok()?;
        let answer = BufReader::new(read).lines().next_line().await.ok()??;
        serde_json::from_str::<AdminResponse>(&answer).ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ask).await,
        Ok(Some(AdminResponse::Users { .. }))
    )
}

/// How to run `quip`: the executable and its QUIP_SERVER, QUIP_CA and QUIP_TOKEN.
#[derive(Debug, Clone)]
pub struct Quip {
    exe: PathBuf,
    server: String,
    ca: PathBuf,
    token: Option<String>,
}

/// What a finished process left.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics, showing stderr, unless the process succeeded.
    pub fn expect_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what}: exited with {}; stderr:\n{}",
            self.status,
            self.stderr
        );
        self
    }

    /// The exit code (`None` if a signal ended the process).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

impl Quip {
    /// `quip` with QUIP_SERVER=`server`, QUIP_CA=`ca` and QUIP_TOKEN=`token` (unset if `None`).
    pub async fn new(
        server: impl Into<String>,
        ca: impl Into<PathBuf>,
        token: Option<&str>,
    ) -> Quip {
        Quip {
            exe: Binaries::get().await.quip.clone(),
            server: server.into(),
            ca: ca.into(),
            token: token.map(str::to_owned),
        }
    }

    /// The same, as another user (or with no token).
    pub fn with_token(&self, token: Option<&str>) -> Quip {
        Quip {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// The command, environment set, stdio piped, killed if dropped.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .args(args)
            .env("QUIP_SERVER", &self.server)
            .env("QUIP_CA", &self.ca)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match &self.token {
            Some(token) => command.env("QUIP_TOKEN", token),
            None => command.env_remove("QUIP_TOKEN"),
        };
        command
    }

    /// Runs `quip ARGS` to completion.
    pub async fn run(&self, args: &[&str]) -> CliOutput {
        let child = self
            .command(args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning quip {args:?}: {e}"));
        Self::finish(child, &format!("quip {}", args.join(" "))).await
    }

    /// Runs `quip ARGS` with `stdin` as its standard input.
    pub async fn run_with_stdin(&self, args: &[&str], stdin: &str) -> CliOutput {
        self.run_with_input(args, stdin.as_bytes()).await
    }

    /// Runs `quip ARGS` with these bytes (UTF-8 or not) as its standard input.
    pub async fn run_with_input(&self, args: &[&str], stdin: &[u8]) -> CliOutput {
        let mut command = self.command(args);
        command.stdin(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning quip {args:?}: {e}"));
        let mut input = child.stdin.take().expect("stdin is piped");
        let bytes = stdin.to_vec();
        // Written while the output is read, so neither pipe can fill up and stall the other.
        let writer = tokio::spawn(async move {
            input.write_all(&bytes).await?;
            input.shutdown().await
        });
        let output = Self::finish(child, &format!("quip {} < stdin", args.join(" "))).await;
        within("writing quip's stdin", writer)
            .await
            .expect("the stdin writer panicked")
            .unwrap_or_else(|e| panic!("writing quip's stdin: {e}; stderr:\n{}", output.stderr));
        output
    }

    /// Starts `quip ARGS` in the background; finish it with [`Quip::finish`].
    pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        self.command(args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning quip {args:?}: {e}"))
    }

    /// Waits (at most [`BULK`]) for a child started by [`Quip::spawn`] and collects its output.
    pub async fn finish(child: tokio::process::Child, what: &str) -> CliOutput {
        let output = within_for(BULK, what, child.wait_with_output())
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        CliOutput {
            status: output.status,
            stdout: String::from_utf8(output.stdout)
                .unwrap_or_else(|e| panic!("{what}: stdout is not UTF-8: {e}")),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}
