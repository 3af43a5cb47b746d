//! `quipd`: serve; check a configuration; administer users, certificates and backups.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use quipd::admin::{self, AdminOptions, AdminRequest, AdminResponse};
use quipd::config::{ConfigFile, LogConfig, LogFormat, Overrides, MAX_CACHE_MB};
use quipd::server::{certs_dir, store_dir, TlsSource};
use quipd::store::{backup, BackendKind};
use quipd::{Server, ServerConfig};
use sd_notify::NotifyState;

/// `println!` that reports a closed standard output (`quipd user list | head -1`) as an error
/// instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).context("writing output")
    }};
}

/// mimalloc rather than the system allocator: the store engines and the message path make
/// many small, short-lived allocations, and glibc's malloc spent about a fifth of the daemon's
/// CPU on them under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "quipd", version, about = "The quip messaging daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon. Flags override the configuration file.
    Serve {
        /// TOML configuration file (see systemd/quipd.toml); without it, the defaults.
        #[arg(long, env = "QUIPD_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory: the store, certificates and the admin socket [default: ./quip-data]
        #[arg(long, env = "QUIPD_DATA")]
        data: Option<PathBuf>,
        /// UDP address to listen on [default: 127.0.0.1:4433]
        #[arg(long, env = "QUIPD_LISTEN")]
        listen: Option<SocketAddr>,
        /// Store engine cache size in MiB [default: 64]
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_CACHE_MB))]
        cache_mb: Option<u64>,
        /// Store engine: sled or fjall [default: sled]
        #[arg(long)]
        store: Option<BackendKind>,
        /// Log lines as JSON instead of text.
        #[arg(long)]
        log_json: bool,
        /// TCP address of the Prometheus endpoint [default: off]
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Check a configuration file without starting: names the bad key and why, or prints the
    /// settings the daemon would run with.
    CheckConfig { file: PathBuf },
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage the devices of users: each device has its own token (or client certificate).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Make certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Write a consistent backup of the store to a file; works while the daemon runs.
    Backup {
        /// The backup file to write (replaced if it exists, only once complete).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        data: DataDir,
    },
    /// Make a new store from a backup file. The data directory must be empty or absent; the
    /// restored store gets a new epoch, so clients reset their cursors.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// The engine of the new store: sled or fjall (must match the daemon's `store`).
        #[arg(long, default_value = "sled")]
        store: BackendKind,
    },
}

/// Which data directory a command works on.
#[derive(Args, Debug)]
struct DataDir {
    /// Data directory [default: ./quip-data, or the configuration file's data_dir]
    #[arg(long, env = "QUIPD_DATA")]
    data: Option<PathBuf>,
    /// Take the data directory from this configuration file.
    #[arg(long, env = "QUIPD_CONFIG")]
    config: Option<PathBuf>,
    /// How long to wait for the running daemon to answer (or for another command working on
    /// the store to finish), in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    timeout: u64,
}

impl DataDir {
    fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(data) = &self.data {
            return Ok(data.clone());
        }
        match &self.config {
            Some(file) => Ok(ConfigFile::load(file)?.data_dir),
            None => Ok(quipd::config::defaults::DATA_DIR.into()),
        }
    }

    fn options(&self) -> AdminOptions {
        AdminOptions {
            create: false,
            timeout: Duration::from_secs(self.timeout),
        }
    }
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create a user and print its bearer token on one line; with --count, create COUNT users
    /// named PREFIX0, PREFIX1, ... at once and print (or write) one `name token` line each.
    Add {
        /// The user's name (not with --count).
        #[arg(required_unless_present = "count", conflicts_with = "count")]
        name: Option<String>,
        /// How many users to create, 1 to 100000.
        #[arg(long, requires = "prefix", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: Option<u32>,
        /// Name prefix of the users --count creates.
        #[arg(long)]
        prefix: Option<String>,
        /// Write the `name token` lines to this file (mode 0600) instead of stdout. It is
        /// created before any user is, so that a path that cannot be written creates nobody.
        #[arg(long, requires = "count")]
        tokens_out: Option<PathBuf>,
        /// Without a running daemon, make a new store if the data directory holds none
        /// (otherwise that is an error, so that a mistyped --data creates nothing).
        #[arg(long)]
        create: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// List users, one per line.
    List {
        #[command(flatten)]
        data: DataDir,
    },
    /// Remove a user: revoke its tokens and certificates, close its connections, take it out of
    /// every conversation (it leaves; its messages stay). Its name is never given out again.
    Remove {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Issue a token for another device of USER and print it on one line (only this once).
    Issue {
        user: String,
        /// A name for the device, shown by `token list`.
        #[arg(long, default_value = "")]
        device: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// List device credentials (tokens and client certificates): id, user, kind, device,
    /// created, last used. Never the tokens themselves.
    List {
        /// Only this user's.
        user: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// Revoke a token or client certificate by its id: it authenticates nobody from now on,
    /// and its open connections are closed at once (REVOKED).
    Revoke {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Make a CA and a server certificate for a small deployment. Clients trust ca.pem; move
    /// ca.key somewhere safe afterwards (the daemon does not need it).
    Init {
        /// The name clients connect to.
        #[arg(long)]
        hostname: String,
        /// Another DNS name or IP address of the server; repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Where to write the files [default: DATA/certs, which the daemon reads]
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        data: DataDir,
    },
    /// Make a client certificate for a device of USER, signed by the CA, and register it: the
    /// device then connects without a token (mutual TLS). Writes NAME.pem and NAME.key.
    Client {
        user: String,
        /// The device's name, shown by `token list`.
        #[arg(long)]
        device: String,
        /// Where to write the certificate and key [default: the current directory]
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// The CA certificate [default: DATA/certs/ca.pem]
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// The CA key [default: DATA/certs/ca.key]
        #[arg(long)]
        ca_key: Option<PathBuf>,
        /// Validity in days, 1 to 36500.
        #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
        #[command(flatten)]
        data: DataDir,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("quipd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Whatever is still running (an abandoned admin task) must not hold up the exit: the
    // store was made durable before `run` returned.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: a closed standard error is no reason to panic.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "quipd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    survive_file_size_limit();
    match cli.command {
        Command::Serve {
            config,
            data,
            listen,
            cache_mb,
            store,
            log_json,
            metrics_listen,
        } => {
            let overrides = Overrides {
                data_dir: data,
                listen,
                cache_mb,
                store,
                log_json,
                metrics_listen,
            };
            let config = match &config {
                Some(path) => ConfigFile::load_server_config(path, &overrides)?.1,
                None => ConfigFile::default().into_server_config(&overrides)?,
            };
            init_logging(&config.log);
            serve(config).await
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::User { command } => {
            init_logging(&default_log());
            let mut tokens_file = None;
            let mut create = false;
            let (data, request) = match command {
                UserCommand::Add {
                    name: Some(name),
                    data,
                    create: asked,
                    ..
                } => {
                    create = asked;
                    (data, AdminRequest::UserAdd { name })
                }
                UserCommand::Add {
                    count,
                    prefix,
                    tokens_out,
                    data,
                    create: asked,
                    ..
                } => {
                    create = asked;
                    // Made first: a path that cannot be written must not cost the tokens of
                    // users already created.
                    tokens_file = match tokens_out {
                        Some(path) => Some((create_private(&path)?, path)),
                        None => None,
                    };
                    let request = AdminRequest::UserAddMany {
                        prefix: prefix.unwrap_or_default(),
                        count: count.unwrap_or(0),
                    };
                    (data, request)
                }
                UserCommand::List { data } => (data, AdminRequest::UserList),
                UserCommand::Remove { name, data } => (data, AdminRequest::UserRemove { name }),
            };
            let options = AdminOptions {
                create,
                ..data.options()
            };
            let answer = admin::run_with(&data.resolve()?, request, options).await;
            let answer = match (answer, &tokens_file) {
                (Err(e), Some((_, path))) => {
                    let _ = std::fs::remove_file(path);
                    return Err(e);
                }
                (answer, _) => answer?,
            };
            match answer {
                AdminResponse::UserAdded { token, .. } => outln!("{token}")?,
                AdminResponse::UserRemoved {
                    user,
                    credentials,
                    closed,
                    conversations,
                } => outln!(
                    "removed {user}: {} revoked, {} closed, left {}",
                    counted(credentials, "credential"),
                    counted(closed, "connection"),
                    counted(conversations, "conversation")
                )?,
                AdminResponse::UsersAdded { users } => {
                    let lines: String = users
                        .iter()
                        .map(|(user, token)| format!("{user} {token}\n"))
                        .collect();
                    match tokens_file {
                        Some((file, path)) => write_tokens(file, &path, lines.as_bytes())?,
                        None => {
                            use std::io::Write as _;
                            std::io::stdout()
                                .lock()
                                .write_all(lines.as_bytes())
                                .context("writing output")?
                        }
                    }
                }
                AdminResponse::Users { users } => {
                    for user in users {
                        outln!("{user}")?;
                    }
                }
                AdminResponse::Error { message } => {
                    if let Some((_, path)) = &tokens_file {
                        let _ = std::fs::remove_file(path);
                    }
                    anyhow::bail!(message)
                }
                other => anyhow::bail!("unexpected answer {other:?}"),
            }
            Ok(())
        }
        Command::Token { command } => {
            init_logging(&default_log());
            token(command).await
        }
        Command::Certs {
            command:
                CertsCommand::Client {
                    user,
                    device,
                    out,
                    ca_cert,
                    ca_key,
                    days,
                    data,
                },
        } => {
            init_logging(&default_log());
            let data_dir_options = &data;
            let data = data.resolve()?;
            let certs = certs_dir(&data);
            let ca_cert = ca_cert.unwrap_or_else(|| certs.join(quip_certs::CA_CERT_FILE));
            let ca_key = ca_key.unwrap_or_else(|| certs.join(quip_certs::CA_KEY_FILE));
            let cert = quip_certs::issue_client_certificate(
                &ca_cert,
                &ca_key,
                &user,
                &device,
                time::Duration::days(i64::from(days)),
            )?;
            let not_after_ms = u64::try_from(cert.not_after.unix_timestamp())
                .ok()
                .map(|s| s * 1000);
            let request = AdminRequest::CertRegister {
                user: user.clone(),
                device: device.clone(),
                der_hex: hex::encode(&cert.der),
                not_after_ms,
            };
            // The files first: a certificate registered without them would be a working
            // credential whose key nobody has. They are removed if the registration fails.
            let name = format!("{user}-{device}");
            let (cert_path, key_path) = quip_certs::write_client_certificate(&out, &name, &cert)?;
            let registered = match admin::run_with(&data, request, data_dir_options.options()).await
            {
                Ok(AdminResponse::CertRegistered { id }) => Ok(id),
                Ok(AdminResponse::Error { message }) => Err(anyhow::anyhow!(message)),
                Ok(other) => Err(anyhow::anyhow!("unexpected answer {other:?}")),
                Err(e) => Err(e),
            };
            let id = match registered {
                Ok(id) => id,
                Err(e) => {
                    let _ = std::fs::remove_file(&cert_path);
                    let _ = std::fs::remove_file(&key_path);
                    return Err(e);
                }
            };
            outln!("{id}")?;
            eprintln!(
                "client certificate {} and key {} for {user}'s device {device:?}, valid until {}",
                cert_path.display(),
                key_path.display(),
                cert.not_after.date()
            );
            Ok(())
        }
        Command::Certs {
            command:
                CertsCommand::Init {
                    hostname,
                    sans,
                    dir,
                    data,
                },
        } => {
            let dir = match dir {
                Some(dir) => dir,
                None => certs_dir(&data.resolve()?),
            };
            let mut settings = quip_certs::PkiSettings::new(hostname);
            settings.extra_names = sans;
            let files = quip_certs::create_pki(&dir, &settings)?;
            outln!("server certificate for {}", files.server_names.join(", "))?;
            outln!("  valid until {}", files.server_not_after.date())?;
            outln!("  {}", files.server_cert.display())?;
            outln!("  {}", files.server_key.display())?;
            outln!("CA certificate for clients: {}", files.ca_cert.display())?;
            outln!(
                "CA key: {} (keep it offline; the daemon does not need it)",
                files.ca_key.display()
            )?;
            Ok(())
        }
        Command::Backup { out, data } => {
            init_logging(&default_log());
            let options = data.options();
            let data = data.resolve()?;
            let summary = admin::backup_with(&data, &out, options).await?;
            outln!(
                "{}: {} conversations, {} events, {} records, store epoch {}",
                out.display(),
                summary.conversations,
                summary.events,
                summary.records,
                summary.epoch
            )?;
            Ok(())
        }
        Command::Restore { from, data, store } => restore(&from, &data, store),
    }
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    let (data, request, json) = match command {
        TokenCommand::Issue { user, device, data } => {
            (data, AdminRequest::TokenIssue { user, device }, false)
        }
        TokenCommand::List { user, json, data } => (data, AdminRequest::TokenList { user }, json),
        TokenCommand::Revoke { id, data } => (data, AdminRequest::TokenRevoke { id }, false),
    };
    match admin::run_with(&data.resolve()?, request, data.options()).await? {
        AdminResponse::TokenIssued { user, id, token } => {
            outln!("{token}")?;
            eprintln!("issued token {id} for {user}");
        }
        AdminResponse::Credentials { credentials } if json => {
            for c in credentials {
                outln!("{}", serde_json::to_string(&c)?)?;
            }
        }
        AdminResponse::Credentials { credentials } => {
            outln!(
                "{:<16}  {:<20}  {:<11}  {:<20}  {:<16}  LAST USED",
                "ID",
                "USER",
                "KIND",
                "DEVICE",
                "CREATED"
            )?;
            for c in credentials {
                let device = if c.device.is_empty() { "-" } else { &c.device };
                outln!(
                    "{:<16}  {:<20}  {:<11}  {:<20}  {:<16}  {}",
                    c.id,
                    c.user,
                    c.kind,
                    device,
                    utc(c.created_at_ms),
                    c.last_used_ms.map_or_else(|| "never".into(), utc)
                )?;
            }
        }
        AdminResponse::Revoked {
            id,
            user,
            device,
            closed,
        } => outln!(
            "revoked {id} ({user}, device {device:?}); closed {}",
            counted(closed, "connection")
        )?,
        AdminResponse::Error { message } => anyhow::bail!(message),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM` in UTC, for listings.
fn utc(ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => ms.to_string(),
    }
}

fn default_log() -> LogConfig {
    LogConfig {
        format: LogFormat::Text,
        filter: "warn".into(),
    }
}

/// `RUST_LOG`, when set, replaces the configured filter; one that does not parse is ignored
/// with a warning (rather than dropping its bad directives and, with them, every log line).
/// Colours only when stderr is a terminal.
fn init_logging(log: &LogConfig) {
    let configured = || tracing_subscriber::EnvFilter::new(&log.filter);
    let (filter, ignored) = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => {
            match tracing_subscriber::EnvFilter::builder().parse(&env) {
                Ok(filter) => (filter, None),
                Err(e) => (configured(), Some((env, e))),
            }
        }
        _ => (configured(), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if let Some((env, e)) = ignored {
        tracing::warn!(
            rust_log = %env,
            error = %e,
            filter = %log.filter,
            "RUST_LOG is not a valid filter; using the configured one"
        );
    }
}

async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics_listen {
        quipd::metrics::install(addr)?;
    }
    let server = Server::bind(&config).await?;
    let tls = server.tls_reloader();
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangups.recv().await.is_some() {
            let mut reloading = vec![NotifyState::Reloading];
            reloading.extend(NotifyState::monotonic_usec_now().ok());
            notify(&reloading);
            if let Err(e) = tls.reload() {
                tracing::error!(error = %format!("{e:#}"), "certificate reload failed; keeping the old certificate");
            }
            notify(&[NotifyState::Ready]);
        }
    });
    // The store is open and the socket bound: connections that arrive now wait in the
    // endpoint's queue until `run` accepts them.
    let listen = server.local_addr()?;
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving on {listen}")),
    ]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(server.store(), interval));
    }
    let store = server.store();
    let stopped = server
        .run(async {
            tokio::select! {
                () = shutdown_signal() => {}
                () = store.failed() => {
                    tracing::error!("the store failed a write: stopping, so that a restart recovers what is durable");
                }
            }
            notify(&[NotifyState::Stopping]);
        })
        .await;
    if store.has_failed() {
        anyhow::bail!(
            "stopped after a store write failed (is the disk full?); every acknowledged \
             message is durable, and the next start recovers the store"
        );
    }
    stopped.context("every acknowledged message is durable, and the next start recovers the store")
}

/// A write past the file size limit (`RLIMIT_FSIZE`, e.g. `LimitFSIZE=` in a unit or
/// `prlimit --fsize`) raises SIGXFSZ, whose default action kills the process. With a handler
/// installed the write fails with EFBIG instead, and the store treats it like a full disk.
fn survive_file_size_limit() {
    use tokio::signal::unix::{signal, SignalKind};
    let xfsz = SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
    match signal(xfsz) {
        Ok(mut signals) => {
            tokio::spawn(async move {
                while signals.recv().await.is_some() {
                    tracing::error!("a store file reached the file size limit (SIGXFSZ)");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGXFSZ"),
    }
}

/// Tells systemd (when it started us with a notify socket) how the daemon is doing.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog while the store still makes writes durable: a daemon whose store
/// refuses writes (after an IO error) or hangs gets restarted.
async fn watchdog(store: quipd::store::Store, interval: Duration) {
    let mut tick = tokio::time::interval(interval / 3);
    loop {
        tick.tick().await;
        match tokio::time::timeout(interval / 3, store.sync()).await {
            Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
            Ok(Err(e)) => tracing::error!(error = %e, "store unhealthy: not pinging the watchdog"),
            Err(_) => tracing::error!("store sync too slow: not pinging the watchdog"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// "1 connection", "2 connections".
fn counted(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

fn check_config(file: &Path) -> anyhow::Result<()> {
    let (parsed, config) = ConfigFile::load_server_config(file, &Overrides::default())?;
    if let TlsSource::Files { cert, key } = &config.tls {
        quip_certs::ServerIdentity::from_pem_files(cert, key)
            .map_err(|e| anyhow::anyhow!("{}: `tls.cert`/`tls.key`: {e}", file.display()))?;
    }
    outln!("{}: ok", file.display())?;
    for (key, value) in quipd::config::settings(&parsed, &config) {
        outln!("{key} = {value}")?;
    }
    Ok(())
}

/// Creates a file only its owner may read (it is to hold bearer tokens).
fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (no user was created)", path.display()))
}

/// Writes the tokens of users just created; if that fails, says how to get tokens for them.
fn write_tokens(mut file: std::fs::File, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| {
            format!(
                "writing {}: the users were created, but not their tokens; issue new ones with \
                 `quipd token issue NAME`",
                path.display()
            )
        })
}

fn restore(from: &Path, data: &Path, store: BackendKind) -> anyhow::Result<()> {
    let occupied = std::fs::read_dir(data)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if occupied {
        anyhow::bail!(
            "{} is not empty: restore makes a new data directory and never overwrites one",
            data.display()
        );
    }
    // A restore that fails leaves no directory behind that it made.
    let made = !data.exists();
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let summary = match backup::restore(from, &store_dir(data), store) {
        Ok(summary) => summary,
        Err(e) => {
            let _ = if made {
                std::fs::remove_dir_all(data)
            } else {
                std::fs::remove_dir_all(store_dir(data))
            };
            return Err(e.into());
        }
    };
    outln!(
        "restored {} of the backup's {} records ({} events) into {}: the store epoch and the \
         end of the text log are made anew",
        summary.records,
        summary.records + summary.remade,
        summary.events,
        data.display()
    )?;
    outln!(
        "new store epoch {} (the backup's was {}): clients reset their cursors",
        summary.epoch,
        summary.backup_epoch
    )?;
    Ok(())
}
