//! The real `quipd` executable, run as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use quip_client::{Client, ClientConfig};

use quipd::server::admin_socket;

pub const QUIPD: &str = env!("CARGO_BIN_EXE_quipd");

/// How long a test waits for a `quipd` process: to start, to exit, to answer.
pub const WAIT: Duration = Duration::from_secs(30);

/// `quipd ARGS` without the environment that would point it at another data directory,
/// configuration, address, log filter or systemd: tests set what they mean to.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(QUIPD);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("QUIPD_DATA")
        .env_remove("QUIPD_CONFIG")
        .env_remove("QUIPD_LISTEN")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    command
}

/// Runs `quipd ARGS` to its end.
pub fn quipd(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Adds user `name` to the store in `data` (through the daemon when one serves it); the token.
pub fn add_user(data: &Path, name: &str) -> String {
    let out = quipd(&["user", "add", name, "--data", data.to_str().unwrap()]);
    assert!(out.status.success(), "user add: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A `quipd` child process, killed on drop so that a failed test leaves nothing running.
pub struct Child(pub std::process::Child);

impl Child {
    pub fn spawn(command: &mut Command) -> Child {
        super::init_tracing();
        Child(command.spawn().unwrap())
    }

    /// Returns once the admin socket of `data` exists: the daemon has opened its store.
    pub fn wait_for_admin_socket(&self, data: &Path) {
        let deadline = Instant::now() + WAIT;
        while !admin_socket(data).exists() {
            assert!(Instant::now() < deadline, "quipd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends signal `name` (`TERM`, `HUP`, `STOP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {name}");
    }

    /// `kill -9`, and the exit collected.
    pub fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// Sends SIGTERM and returns the exit status and how long the exit took.
    pub fn terminate(mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        self.signal("TERM");
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < WAIT, "quipd did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `quipd serve --config FILE` with JSON logs, which tell its address and what it did.
pub struct Quipd {
    pub child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// Every log line after the ready line.
    pub logs: mpsc::Receiver<String>,
}

impl Quipd {
    /// Starts `quipd serve --config FILE` with `args`; returns once it logged that it is ready.
    pub fn start(config: &Path, data: &Path, args: &[&str], env: &[(&str, &str)]) -> Quipd {
        let mut command = command(&["serve", "--config"]);
        command
            .arg(config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = Child::spawn(&mut command);
        let stderr = child.0.stderr.take().unwrap();
        let (lines, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let addr = loop {
            let line = logs
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("quipd did not get ready: {:?}", child.0.try_wait()));
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                panic!("not a JSON log line: {line}");
            };
            if json["fields"]["message"] == "quipd ready" {
                break json["fields"]["listen"].as_str().unwrap().parse().unwrap();
            }
        };
        Quipd {
            child,
            addr,
            data: data.to_owned(),
            logs,
        }
    }

    pub fn signal(&self, name: &str) {
        self.child.signal(name);
    }

    /// Sends SIGTERM and returns the exit status and how long the exit took.
    pub fn terminate(self) -> (ExitStatus, Duration) {
        self.child.terminate()
    }

    /// Waits for a log line containing `text`.
    pub fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let line = self
                .logs
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no log line with {text:?}"));
            if line.contains(text) {
                return line;
            }
        }
    }

    pub fn client_config(&self, token: &str) -> ClientConfig {
        ClientConfig::from_ca_file(self.addr.to_string(), self.data.join("certs/ca.pem"), token)
            .unwrap()
    }

    pub async fn connect(&self, token: &str) -> Client {
        tokio::time::timeout(WAIT, Client::connect(self.client_config(token)))
            .await
            .expect("connect timed out")
            .expect("connect")
    }
}

/// Writes a configuration file for a test daemon: JSON logs, loopback, an OS-chosen port.
pub fn config_file(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let path = dir.join("quipd.toml");
    let text = format!(
        "data_dir = {data:?}\nlisten = \"127.0.0.1:0\"\ncache_mb = 16\n{extra}\n[log]\nformat = \"json\"\nfilter = \"info\"\n",
        data = data.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}
