//! The real `quipd` executable, run as a child process.

use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

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
