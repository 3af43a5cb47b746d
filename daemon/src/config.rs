//! The configuration file: what an operator writes ([`ConfigFile`], TOML, every field optional
//! with a default) and its conversion into the typed [`ServerConfig`] the daemon runs with.
//!
//! The file is strict: an unknown key or a value of the wrong type is an error that names the
//! key, so a typo never silently falls back to a default. `systemd/quipd.toml` documents every
//! key with its default; a test parses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::connected::ConnectedLimits;
use crate::conversation::{ConversationLimits, Retention};
use crate::presence::EphemeralLimits;
use crate::push::{Hook, Preview, PushConfig};
use crate::server::{ClientAuth, ServerConfig, TlsSource};
use crate::session::Limits;
use crate::store::BackendKind;

/// Defaults, shared by the file format and [`ServerConfig::new`].
pub mod defaults {
    pub const DATA_DIR: &str = "./quip-data";
    pub const LISTEN: &str = "127.0.0.1:4433";
    pub const CACHE_MB: u64 = 64;
    pub const SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
    pub const MAX_CONNECTIONS: u32 = 10_000;
    pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
    pub const AUTH_TIMEOUT_MS: u64 = 10_000;
    pub const IDLE_TIMEOUT_MS: u64 = 30_000;
    pub const LOG_FILTER: &str = "info";
}

/// The longest duration any `_ms` setting may have: one day. Far below what QUIC's idle
/// timeout can carry (2^62 ms) and what a clock can add without overflowing, and above any
/// sensible timeout or interval.
pub const MAX_DURATION_MS: u64 = 86_400_000;
/// The largest store cache, in MiB (1 TiB).
pub const MAX_CACHE_MB: u64 = 1 << 20;
/// The longest retention, in days (a hundred years).
pub const MAX_KEEP_DAYS: u64 = 36_500;
/// The longest typing relay interval: clients repeat `Typing` every 3 s and receivers drop an
/// indicator 6 s after the last one, so an interval much past 2 s would let indicators flicker.
pub const MAX_TYPING_RELAY_INTERVAL_MS: u64 = 2_000;

/// A configuration error, naming the key and why it is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: line {line}: `{key}`: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
    #[error("`{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// An invalid value of a file whose line could not be told (a default the file's other
    /// settings make invalid).
    #[error("{path}: `{key}`: {reason}")]
    InFile {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

impl ConfigError {
    /// The key the error is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { key, .. } => Some(key),
            ConfigError::Invalid { key, .. } | ConfigError::InFile { key, .. } => Some(key),
        }
    }

    /// The error with the file, and the line of the key when the file sets it.
    fn located(self, path: &Path, text: &str) -> ConfigError {
        match self {
            ConfigError::Invalid { key, reason } => match line_of(text, key) {
                Some(line) => ConfigError::Parse {
                    path: path.to_owned(),
                    line,
                    key: key.to_owned(),
                    reason,
                },
                None => ConfigError::InFile {
                    path: path.to_owned(),
                    key,
                    reason,
                },
            },
            other => other,
        }
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// A count that must lie in `min..=max`.
fn within<T: PartialOrd + std::fmt::Display + Copy>(
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(invalid(key, format!("must be {min} to {max}, not {value}")));
    }
    Ok(value)
}

/// A count that must be at least `min`.
fn at_least(key: &'static str, value: u32, min: u32) -> Result<u32, ConfigError> {
    if value < min {
        return Err(invalid(key, format!("must be at least {min}, not {value}")));
    }
    Ok(value)
}

/// A duration in milliseconds, `min_ms` to [`MAX_DURATION_MS`] (or `max_ms` if lower).
fn millis(key: &'static str, ms: u64, min_ms: u64, max_ms: u64) -> Result<Duration, ConfigError> {
    within(key, ms, min_ms, max_ms.min(MAX_DURATION_MS)).map(Duration::from_millis)
}

/// `quipd.toml` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    /// The store, the development certificates and the admin socket live here.
    pub data_dir: PathBuf,
    /// UDP address for QUIC.
    pub listen: String,
    /// The store's engine: `sled` (the default) or `fjall`.
    pub store: BackendKind,
    /// The store engine's cache, in MiB.
    pub cache_mb: u64,
    /// How long a graceful shutdown may take before the remaining connections are cut.
    pub shutdown_timeout_ms: u64,
    pub tls: TlsSection,
    pub limits: LimitsSection,
    pub log: LogSection,
    pub metrics: MetricsSection,
    pub push: PushSection,
    pub retention: RetentionSection,
}

impl Default for ConfigFile {
    fn default() -> Self {
        ConfigFile {
            data_dir: defaults::DATA_DIR.into(),
            listen: defaults::LISTEN.into(),
            store: BackendKind::default(),
            cache_mb: defaults::CACHE_MB,
            shutdown_timeout_ms: defaults::SHUTDOWN_TIMEOUT_MS,
            tls: TlsSection::default(),
            limits: LimitsSection::default(),
            log: LogSection::default(),
            metrics: MetricsSection::default(),
            push: PushSection::default(),
            retention: RetentionSection::default(),
        }
    }
}

/// The offline push hook (see `push.rs`): off unless `url` or `command` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushSection {
    /// POST notifications as JSON to this `http://` or `https://` URL.
    pub url: Option<String>,
    /// Or run this program and arguments with the JSON on standard input.
    pub command: Option<Vec<String>>,
    /// What a notification shows: `none`, `sender` or `text`.
    pub preview: Preview,
    pub batch_window_ms: u64,
    /// Calls per user and minute, at most.
    pub per_user_per_minute: u32,
    /// Calls of one batch, the first included.
    pub max_attempts: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub timeout_ms: u64,
    /// Messages waiting for the hook; more are dropped and counted.
    pub queue: usize,
}

impl Default for PushSection {
    fn default() -> Self {
        PushSection {
            url: None,
            command: None,
            preview: Preview::Sender,
            batch_window_ms: 2_000,
            per_user_per_minute: 6,
            max_attempts: 5,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            timeout_ms: 10_000,
            queue: 4096,
        }
    }
}

/// Retention of every conversation: off (0) unless set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Keep the newest this many events of each conversation; 0: no limit.
    pub keep_events: u64,
    /// Keep events younger than this many days; 0: no limit.
    pub keep_days: u64,
    /// Other limits for some conversations, by id: `[retention.conversations.123]`.
    pub conversations: std::collections::BTreeMap<String, RetentionLimits>,
}

/// One conversation's limits; 0 is no limit.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionLimits {
    pub keep_events: u64,
    pub keep_days: u64,
}

impl RetentionLimits {
    fn retention(&self) -> Retention {
        Retention {
            keep_events: (self.keep_events > 0).then_some(self.keep_events),
            keep_for: (self.keep_days > 0)
                .then(|| Duration::from_secs(self.keep_days.saturating_mul(86_400))),
        }
    }
}

/// Retention as the daemon applies it: a default and per-conversation exceptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionConfig {
    pub default: Retention,
    pub conversations: std::collections::HashMap<quip_protocol::ConversationId, Retention>,
}

impl RetentionConfig {
    pub fn of(&self, conv: quip_protocol::ConversationId) -> Retention {
        self.conversations
            .get(&conv)
            .copied()
            .unwrap_or(self.default)
    }
}

impl PushSection {
    fn push_config(&self) -> Result<Option<PushConfig>, ConfigError> {
        // Checked even while the hook is off, so that turning it on cannot start a bad value.
        let batch_window = millis("push.batch_window_ms", self.batch_window_ms, 0, u64::MAX)?;
        within(
            "push.per_user_per_minute",
            self.per_user_per_minute,
            1,
            60_000,
        )?;
        within("push.max_attempts", self.max_attempts, 1, 1000)?;
        let retry_initial = millis("push.retry_initial_ms", self.retry_initial_ms, 1, u64::MAX)?;
        let retry_max = millis(
            "push.retry_max_ms",
            self.retry_max_ms,
            self.retry_initial_ms,
            u64::MAX,
        )?;
        let timeout = millis("push.timeout_ms", self.timeout_ms, 1, u64::MAX)?;
        within("push.queue", self.queue, 1, 10_000_000)?;
        let hook = match (&self.url, &self.command) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "push.command",
                    "set push.url or push.command, not both",
                ))
            }
            (Some(url), None) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid("push.url", "must start with http:// or https://"));
                }
                Hook::Http { url: url.clone() }
            }
            (None, Some(command)) => match command.split_first() {
                Some((program, args)) if !program.is_empty() => Hook::Command {
                    program: program.into(),
                    args: args.to_vec(),
                },
                _ => return Err(invalid("push.command", "names no program")),
            },
        };
        Ok(Some(PushConfig {
            hook,
            preview: self.preview,
            batch_window,
            per_user_interval: Duration::from_secs(60) / self.per_user_per_minute,
            max_attempts: self.max_attempts,
            retry_initial,
            retry_max,
            timeout,
            queue: self.queue,
        }))
    }
}

impl RetentionSection {
    fn retention_config(&self) -> Result<RetentionConfig, ConfigError> {
        within("retention.keep_days", self.keep_days, 0, MAX_KEEP_DAYS)?;
        let default = RetentionLimits {
            keep_events: self.keep_events,
            keep_days: self.keep_days,
        }
        .retention();
        let mut conversations = std::collections::HashMap::new();
        for (id, limits) in &self.conversations {
            let conv = id.parse().map_err(|_| {
                invalid(
                    "retention.conversations",
                    format!("{id:?} is not a conversation id"),
                )
            })?;
            if limits.keep_days > MAX_KEEP_DAYS {
                return Err(invalid(
                    "retention.conversations",
                    format!(
                        "keep_days of conversation {id} must be 0 to {MAX_KEEP_DAYS}, not {}",
                        limits.keep_days
                    ),
                ));
            }
            conversations.insert(conv, limits.retention());
        }
        Ok(RetentionConfig {
            default,
            conversations,
        })
    }
}

/// Certificate files from elsewhere (an ACME client, an internal CA). Both or neither; with
/// neither, the daemon uses `DATA/certs` and makes a development PKI there on first start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Whether clients may identify a device with a client certificate (mutual TLS).
    pub client_auth: bool,
    /// The CA that signs client certificates; without it, `DATA/certs/ca.pem` when the daemon
    /// uses `DATA/certs`.
    pub client_ca: Option<PathBuf>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            client_auth: true,
            client_ca: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Connections served at once; more are refused.
    pub max_connections: u32,
    pub handshake_timeout_ms: u64,
    /// Time between the handshake and a valid `Hello`.
    pub auth_timeout_ms: u64,
    /// A connection silent for this long is closed.
    pub idle_timeout_ms: u64,
    /// Largest frame accepted, in bytes; at most the protocol's limit.
    pub max_frame_len: u32,
    /// How long a user whose last device disconnected still shows as online.
    pub presence_grace_ms: u64,
    /// Datagrams (typing) a connection may send per second, and in one burst.
    pub datagrams_in_per_sec: u32,
    pub datagrams_in_burst: u32,
    /// Datagrams the server sends one connection per second, and in one burst.
    pub datagrams_out_per_sec: u32,
    pub datagrams_out_burst: u32,
    /// A user's repeated typing in one conversation is relayed at most this often.
    pub typing_relay_interval_ms: u64,
    /// Largest message text, in bytes; at most the protocol's limit.
    pub max_message_len: u32,
    /// Members of one conversation, its creator included.
    pub max_members: u32,
    /// Conversations one user may be a member of.
    pub max_conversations_per_user: u32,
    /// Connections one user may have open at once, over all its devices.
    pub max_connections_per_user: u32,
    /// Requests that append an event (sends, creations, membership changes) one device may
    /// make per second, and in one burst.
    pub sends_per_sec: u32,
    pub sends_burst: u32,
    /// When this many connections are handshaking or waiting for their Hello, new ones must
    /// first validate their address (QUIC Retry); 0: every connection.
    pub retry_threshold: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let ephemeral = EphemeralLimits::default();
        let session = Limits::default();
        LimitsSection {
            max_message_len: session.max_message_len as u32,
            max_members: session.conversations.max_members as u32,
            max_conversations_per_user: session.conversations.max_conversations_per_user as u32,
            max_connections_per_user: session.connected.max_connections_per_user as u32,
            sends_per_sec: session.connected.sends_per_sec,
            sends_burst: session.connected.sends_burst,
            retry_threshold: session.retry_threshold as u32,
            max_connections: defaults::MAX_CONNECTIONS,
            handshake_timeout_ms: defaults::HANDSHAKE_TIMEOUT_MS,
            auth_timeout_ms: defaults::AUTH_TIMEOUT_MS,
            idle_timeout_ms: defaults::IDLE_TIMEOUT_MS,
            max_frame_len: quip_protocol::limits::MAX_FRAME_LEN,
            presence_grace_ms: ephemeral.presence_grace.as_millis() as u64,
            datagrams_in_per_sec: ephemeral.datagrams_in_per_sec,
            datagrams_in_burst: ephemeral.datagrams_in_burst,
            datagrams_out_per_sec: ephemeral.datagrams_out_per_sec,
            datagrams_out_burst: ephemeral.datagrams_out_burst,
            typing_relay_interval_ms: ephemeral.typing_relay_interval.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json` (one object per line).
    pub format: LogFormat,
    /// A tracing filter (`info`, `quipd=debug,info`, ...); `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            filter: defaults::LOG_FILTER.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The name the file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// TCP address of the Prometheus endpoint (`/metrics`); off when absent.
    pub listen: Option<String>,
}

/// How logs are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

/// Command-line settings that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub cache_mb: Option<u64>,
    pub store: Option<BackendKind>,
    pub log_json: bool,
    pub metrics_listen: Option<SocketAddr>,
}

impl ConfigFile {
    /// Reads a file and makes the runtime configuration of it, the command line on top; every
    /// error names the file, the key and, when the file sets it, the line.
    pub fn load_server_config(
        path: &Path,
        overrides: &Overrides,
    ) -> Result<(ConfigFile, ServerConfig), ConfigError> {
        let text = read(path)?;
        let file = Self::parse(&text).map_err(|e| e.in_file(path))?;
        let config = file
            .clone()
            .into_server_config(overrides)
            .map_err(|e| e.located(path, &text))?;
        Ok((file, config))
    }

    /// Reads and parses a file; errors name the file, the line and the key.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = read(path)?;
        Self::parse(&text).map_err(|e| e.in_file(path))
    }

    pub fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, key) = e
                .span()
                .map_or((0, String::from("?")), |span| key_at(text, span.start));
            ConfigError::Parse {
                path: PathBuf::new(),
                line,
                key,
                reason: e.message().trim().to_owned(),
            }
        })
    }

    /// The runtime configuration: the file, then the command line on top. Every value is
    /// checked against its range here, so that `check-config` finds what `serve` would trip on.
    pub fn into_server_config(self, overrides: &Overrides) -> Result<ServerConfig, ConfigError> {
        let listen = match overrides.listen {
            Some(listen) => listen,
            None => parse_addr("listen", &self.listen)?,
        };
        let metrics_listen = match (overrides.metrics_listen, &self.metrics.listen) {
            (Some(addr), _) => Some(addr),
            (None, Some(addr)) => Some(parse_addr("metrics.listen", addr)?),
            (None, None) => None,
        };
        let client_auth = match (self.tls.client_auth, self.tls.client_ca, &self.tls.cert) {
            (false, _, _) => ClientAuth::Off,
            (true, Some(ca), _) => ClientAuth::Ca(ca),
            (true, None, None) => ClientAuth::DataDirCa,
            (true, None, Some(_)) => ClientAuth::Off,
        };
        let tls = match (self.tls.cert, self.tls.key) {
            (None, None) => TlsSource::DataDir,
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key",
                    "tls.cert is set, so tls.key must be too",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert",
                    "tls.key is set, so tls.cert must be too",
                ))
            }
        };
        let limits = &self.limits;
        let max_frame = quip_protocol::limits::MAX_FRAME_LEN;
        if limits.max_frame_len < 1024 || limits.max_frame_len > max_frame {
            return Err(invalid(
                "limits.max_frame_len",
                format!("must be between 1024 and {max_frame}"),
            ));
        }
        let max_text = quip_protocol::limits::MAX_TEXT_LEN as u32;
        if limits.max_message_len == 0 || limits.max_message_len > max_text {
            return Err(invalid(
                "limits.max_message_len",
                format!("must be between 1 and {max_text}"),
            ));
        }
        let needed = frame_len_for_messages(limits.max_message_len);
        if limits.max_frame_len < needed {
            return Err(invalid(
                "limits.max_frame_len",
                format!(
                    "must be at least {needed} with limits.max_message_len = {}: a message, its \
                     latest edit and its reactions must fit in one answer",
                    limits.max_message_len
                ),
            ));
        }
        for (key, value) in [
            ("limits.max_connections", limits.max_connections),
            ("limits.max_members", limits.max_members),
            (
                "limits.max_conversations_per_user",
                limits.max_conversations_per_user,
            ),
            (
                "limits.max_connections_per_user",
                limits.max_connections_per_user,
            ),
            ("limits.sends_per_sec", limits.sends_per_sec),
            ("limits.sends_burst", limits.sends_burst),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let positive = |key: &'static str, ms: u64| millis(key, ms, 1, u64::MAX);
        let cache_mb = within(
            "cache_mb",
            overrides.cache_mb.unwrap_or(self.cache_mb),
            1,
            MAX_CACHE_MB,
        )?;
        for (key, value) in [
            ("limits.datagrams_in_per_sec", limits.datagrams_in_per_sec),
            ("limits.datagrams_in_burst", limits.datagrams_in_burst),
            ("limits.datagrams_out_per_sec", limits.datagrams_out_per_sec),
            ("limits.datagrams_out_burst", limits.datagrams_out_burst),
        ] {
            at_least(key, value, 1)?;
        }
        let presence_grace = millis(
            "limits.presence_grace_ms",
            limits.presence_grace_ms,
            0,
            u64::MAX,
        )?;
        let typing_relay_interval = millis(
            "limits.typing_relay_interval_ms",
            limits.typing_relay_interval_ms,
            0,
            MAX_TYPING_RELAY_INTERVAL_MS,
        )?;
        let filter = self.log.filter.trim().to_owned();
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&filter) {
            return Err(invalid("log.filter", e.to_string()));
        }
        let push = self.push.push_config()?;
        let retention = self.retention.retention_config()?;
        Ok(ServerConfig {
            push,
            retention,
            data_dir: overrides.data_dir.clone().unwrap_or(self.data_dir),
            listen,
            store: overrides.store.unwrap_or(self.store),
            cache_bytes: cache_mb * 1024 * 1024,
            limits: Limits {
                handshake_timeout: positive(
                    "limits.handshake_timeout_ms",
                    limits.handshake_timeout_ms,
                )?,
                auth_timeout: positive("limits.auth_timeout_ms", limits.auth_timeout_ms)?,
                max_frame_len: limits.max_frame_len,
                max_message_len: limits.max_message_len as usize,
                conversations: ConversationLimits {
                    max_members: limits.max_members as usize,
                    max_conversations_per_user: limits.max_conversations_per_user as usize,
                },
                connected: ConnectedLimits {
                    max_connections_per_user: limits.max_connections_per_user as usize,
                    sends_per_sec: limits.sends_per_sec,
                    sends_burst: limits.sends_burst,
                },
                retry_threshold: limits.retry_threshold as usize,
                ephemeral: EphemeralLimits {
                    presence_grace,
                    datagrams_in_per_sec: limits.datagrams_in_per_sec,
                    datagrams_in_burst: limits.datagrams_in_burst,
                    datagrams_out_per_sec: limits.datagrams_out_per_sec,
                    datagrams_out_burst: limits.datagrams_out_burst,
                    typing_relay_interval,
                },
            },
            max_connections: limits.max_connections,
            idle_timeout: positive("limits.idle_timeout_ms", limits.idle_timeout_ms)?,
            tls,
            client_auth,
            shutdown_timeout: positive("shutdown_timeout_ms", self.shutdown_timeout_ms)?,
            metrics_listen,
            log: LogConfig {
                format: if overrides.log_json {
                    LogFormat::Json
                } else {
                    self.log.format
                },
                filter,
            },
        })
    }
}

/// Every setting as `quipd check-config` prints it: each key of the file with the value the
/// daemon runs with (the file's, the default or the command line's, in the file's units), and
/// the paths it derives (`store_dir`, the resolved `tls.*` files).
/// The smallest frame that carries any one event of messages up to `max_message_len` bytes,
/// with what a history page adds to it: the message, the text of its latest edit, and its
/// reactions (at most 256 of up to 32-byte emoji and 32-byte names).
fn frame_len_for_messages(max_message_len: u32) -> u32 {
    const REACTIONS_AND_FIELDS: u32 = 32 * 1024;
    2 * max_message_len + REACTIONS_AND_FIELDS
}

pub fn settings(file: &ConfigFile, config: &ServerConfig) -> Vec<(String, String)> {
    let ms = |d: Duration| d.as_millis().to_string();
    let limits = &config.limits;
    let ephemeral = &limits.ephemeral;
    let (cert, key) = config.tls_files();
    let mut all: Vec<(&str, String)> = vec![
        ("data_dir", config.data_dir.display().to_string()),
        ("store", config.store.to_string()),
        (
            "store_dir",
            crate::server::store_dir(&config.data_dir)
                .display()
                .to_string(),
        ),
        ("listen", config.listen.to_string()),
        ("cache_mb", (config.cache_bytes / (1024 * 1024)).to_string()),
        ("shutdown_timeout_ms", ms(config.shutdown_timeout)),
        ("tls.cert", cert.display().to_string()),
        ("tls.key", key.display().to_string()),
        ("tls.client_auth", file.tls.client_auth.to_string()),
        (
            "tls.client_ca",
            match &config.client_auth {
                ClientAuth::Off => "off (tokens only)".to_owned(),
                ClientAuth::Ca(ca) => ca.display().to_string(),
                ClientAuth::DataDirCa => {
                    let ca =
                        crate::server::certs_dir(&config.data_dir).join(quip_certs::CA_CERT_FILE);
                    if ca.exists() {
                        ca.display().to_string()
                    } else {
                        format!("{} (made on the first start)", ca.display())
                    }
                }
            },
        ),
        ("limits.max_connections", config.max_connections.to_string()),
        ("limits.handshake_timeout_ms", ms(limits.handshake_timeout)),
        ("limits.auth_timeout_ms", ms(limits.auth_timeout)),
        ("limits.idle_timeout_ms", ms(config.idle_timeout)),
        ("limits.max_frame_len", limits.max_frame_len.to_string()),
        ("limits.presence_grace_ms", ms(ephemeral.presence_grace)),
        (
            "limits.datagrams_in_per_sec",
            ephemeral.datagrams_in_per_sec.to_string(),
        ),
        (
            "limits.datagrams_in_burst",
            ephemeral.datagrams_in_burst.to_string(),
        ),
        (
            "limits.datagrams_out_per_sec",
            ephemeral.datagrams_out_per_sec.to_string(),
        ),
        (
            "limits.datagrams_out_burst",
            ephemeral.datagrams_out_burst.to_string(),
        ),
        (
            "limits.typing_relay_interval_ms",
            ms(ephemeral.typing_relay_interval),
        ),
        ("limits.max_message_len", limits.max_message_len.to_string()),
        (
            "limits.max_members",
            limits.conversations.max_members.to_string(),
        ),
        (
            "limits.max_conversations_per_user",
            limits.conversations.max_conversations_per_user.to_string(),
        ),
        (
            "limits.max_connections_per_user",
            limits.connected.max_connections_per_user.to_string(),
        ),
        (
            "limits.sends_per_sec",
            limits.connected.sends_per_sec.to_string(),
        ),
        (
            "limits.sends_burst",
            limits.connected.sends_burst.to_string(),
        ),
        ("limits.retry_threshold", limits.retry_threshold.to_string()),
        ("log.format", config.log.format.as_str().to_owned()),
        ("log.filter", config.log.filter.clone()),
        (
            "metrics.listen",
            config
                .metrics_listen
                .map_or_else(|| "off".to_owned(), |addr| addr.to_string()),
        ),
    ];
    let push = &file.push;
    let hook = match config.push.as_ref().map(|p| &p.hook) {
        Some(Hook::Http { url }) => ("push.url", url.clone()),
        Some(Hook::Command { program, args }) => {
            let mut command = vec![program.display().to_string()];
            command.extend(args.iter().cloned());
            ("push.command", format!("{command:?}"))
        }
        None => (
            "push",
            "off (neither push.url nor push.command is set)".to_owned(),
        ),
    };
    all.push(hook);
    let preview = match push.preview {
        Preview::None => "none",
        Preview::Sender => "sender",
        Preview::Text => "text",
    };
    all.extend([
        ("push.preview", preview.to_owned()),
        ("push.batch_window_ms", push.batch_window_ms.to_string()),
        (
            "push.per_user_per_minute",
            push.per_user_per_minute.to_string(),
        ),
        ("push.max_attempts", push.max_attempts.to_string()),
        ("push.retry_initial_ms", push.retry_initial_ms.to_string()),
        ("push.retry_max_ms", push.retry_max_ms.to_string()),
        ("push.timeout_ms", push.timeout_ms.to_string()),
        ("push.queue", push.queue.to_string()),
        (
            "retention.keep_events",
            file.retention.keep_events.to_string(),
        ),
        ("retention.keep_days", file.retention.keep_days.to_string()),
    ]);
    let mut all: Vec<(String, String)> = all
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    for (id, limits) in &file.retention.conversations {
        all.push((
            format!("retention.conversations.{id}.keep_events"),
            limits.keep_events.to_string(),
        ));
        all.push((
            format!("retention.conversations.{id}.keep_days"),
            limits.keep_days.to_string(),
        ));
    }
    all
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })
}

impl ConfigError {
    /// A parse error of the text of `path`.
    fn in_file(self, path: &Path) -> ConfigError {
        match self {
            ConfigError::Parse {
                line, key, reason, ..
            } => ConfigError::Parse {
                path: path.to_owned(),
                line,
                key,
                reason,
            },
            other => other,
        }
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?} is not an IP address with a port (like \"127.0.0.1:4433\" or \"[::]:4433\")"),
        )
    })
}

/// The line (1-based) that sets the dotted `key` in a TOML text, or the header of the table it
/// names.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let mut table = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let dotted = if let Some(header) = line.strip_prefix('[') {
            table = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            table.clone()
        } else if line.starts_with('#') || !line.contains('=') {
            continue;
        } else {
            let name = line
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"');
            if table.is_empty() {
                name.to_owned()
            } else {
                format!("{table}.{name}")
            }
        };
        let nested = dotted
            .strip_prefix(key)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        if nested {
            return Some(n + 1);
        }
    }
    None
}

/// The line number (1-based) and the dotted key at byte `offset` of a TOML text: the key on
/// that line (or the table header's name), prefixed by the table it is in.
fn key_at(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut table = String::new();
    let mut key = String::new();
    for (n, line) in text.lines().enumerate().take(line_no) {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("");
            table = name.trim().to_owned();
            if n + 1 == line_no {
                return (line_no, table);
            }
        } else if n + 1 == line_no {
            key = line
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                .to_owned();
        }
    }
    let key = match (table.is_empty(), key.is_empty()) {
        (_, true) => table,
        (true, false) => key,
        (false, false) => format!("{table}.{key}"),
    };
    (line_no, key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn server_config(text: &str) -> Result<ServerConfig, ConfigError> {
        ConfigFile::parse(text)?.into_server_config(&Overrides::default())
    }

    fn error_key(text: &str) -> String {
        let err = server_config(text).unwrap_err();
        err.key().unwrap().to_owned()
    }

    #[test]
    fn every_example_config_parses() {
        // The operators' example, and the settings the benchmarks run with.
        for folder in ["../systemd", "../bench"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(folder);
            let mut seen = 0;
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let file = ConfigFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                    file.into_server_config(&Overrides::default())
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    seen += 1;
                }
            }
            assert!(seen > 0, "no example config in {}", dir.display());
        }
    }

    #[test]
    fn the_example_sets_the_defaults_except_where_a_deployment_differs() {
        // The example is the reference for operators: its values are the defaults, except the
        // two a systemd deployment changes (their defaults are written in its comments).
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/quipd.toml");
        let mut example = ConfigFile::load(&path).unwrap();
        assert_eq!(example.data_dir, PathBuf::from("/var/lib/quipd"));
        assert_eq!(example.listen, "[::]:4433");
        let defaults = ConfigFile::default();
        example.data_dir = defaults.data_dir.clone();
        example.listen = defaults.listen.clone();
        assert_eq!(example, defaults);
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = server_config("").unwrap();
        let expected = ServerConfig::new(defaults::DATA_DIR, defaults::LISTEN.parse().unwrap());
        assert_eq!(config.listen, expected.listen);
        assert_eq!(config.data_dir, expected.data_dir);
        assert_eq!(config.cache_bytes, expected.cache_bytes);
        assert_eq!(config.store, BackendKind::Sled);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.tls, TlsSource::DataDir);
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.client_auth, ClientAuth::DataDirCa);
        let limits = &config.limits;
        assert_eq!(limits.max_message_len, 65_536);
        assert_eq!(limits.conversations, ConversationLimits::default());
        assert_eq!(limits.connected, ConnectedLimits::default());
        assert_eq!(limits.retry_threshold, 64);
    }

    #[test]
    fn client_certificates_follow_the_tls_section() {
        let off = server_config("[tls]\nclient_auth = false\n").unwrap();
        assert_eq!(off.client_auth, ClientAuth::Off);
        let ca = server_config("[tls]\nclient_ca = \"/etc/quipd/clients.pem\"\n").unwrap();
        assert_eq!(
            ca.client_auth,
            ClientAuth::Ca("/etc/quipd/clients.pem".into())
        );
        // With certificates from elsewhere there is no CA of ours to trust unless named.
        let acme = server_config("[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n").unwrap();
        assert_eq!(acme.client_auth, ClientAuth::Off);
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(error_key("lissten = \"127.0.0.1:1\"\n"), "lissten");
        assert_eq!(
            error_key("[limits]\nmax_connections = 5\nauth_timeout = 5\n"),
            "limits.auth_timeout"
        );
        assert_eq!(
            error_key("[metric]\nlisten = \"127.0.0.1:9464\"\n"),
            "metric"
        );
    }

    #[test]
    fn wrong_types_and_values_are_named_with_the_reason() {
        let err = server_config("cache_mb = \"lots\"\n").unwrap_err();
        assert_eq!(err.key(), Some("cache_mb"));
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(
            error_key("[limits]\nidle_timeout_ms = -1\n"),
            "limits.idle_timeout_ms"
        );
        assert_eq!(error_key("[log]\nformat = \"xml\"\n"), "log.format");
        assert_eq!(error_key("store = \"rocksdb\"\n"), "store");
        assert_eq!(error_key("listen = \"localhost\"\n"), "listen");
        assert_eq!(
            error_key("[metrics]\nlisten = \"9464\"\n"),
            "metrics.listen"
        );
        assert_eq!(error_key("[tls]\ncert = \"/x.pem\"\n"), "tls.key");
        assert_eq!(
            error_key("shutdown_timeout_ms = 0\n"),
            "shutdown_timeout_ms"
        );
        assert_eq!(
            error_key("[limits]\nmax_frame_len = 100000000\n"),
            "limits.max_frame_len"
        );
        // A frame must hold the largest message with its edit and reactions.
        assert_eq!(
            error_key("[limits]\nmax_frame_len = 1024\n"),
            "limits.max_frame_len"
        );
        assert_eq!(
            error_key("[limits]\nmax_message_len = 1000\nmax_frame_len = 34767\n"),
            "limits.max_frame_len"
        );
        assert!(server_config("[limits]\nmax_message_len = 1000\nmax_frame_len = 34768\n").is_ok());
        assert_eq!(error_key("[log]\nfilter = \"info,[\"\n"), "log.filter");
        assert_eq!(
            error_key("[limits]\nmax_message_len = 65537\n"),
            "limits.max_message_len"
        );
        for key in [
            "max_members",
            "max_conversations_per_user",
            "max_connections_per_user",
            "sends_per_sec",
            "sends_burst",
        ] {
            assert_eq!(
                error_key(&format!("[limits]\n{key} = 0\n")),
                format!("limits.{key}")
            );
        }
        let err = server_config("listen = \"localhost\"\n").unwrap_err();
        assert!(err.to_string().contains("not an IP address"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = ConfigFile::parse(
            "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:1\"\ncache_mb = 8\n\
             [log]\nformat = \"text\"\n[metrics]\nlisten = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let same = file
            .clone()
            .into_server_config(&Overrides::default())
            .unwrap();
        assert_eq!(same.data_dir, PathBuf::from("/from/file"));
        assert_eq!(same.cache_bytes, 8 * 1024 * 1024);
        let overrides = Overrides {
            data_dir: Some("/from/flag".into()),
            listen: Some("127.0.0.1:3".parse().unwrap()),
            cache_mb: Some(16),
            store: Some(BackendKind::Fjall),
            log_json: true,
            metrics_listen: Some("127.0.0.1:4".parse().unwrap()),
        };
        let config = file.into_server_config(&overrides).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(config.listen, "127.0.0.1:3".parse().unwrap());
        assert_eq!(config.cache_bytes, 16 * 1024 * 1024);
        assert_eq!(config.store, BackendKind::Fjall);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.metrics_listen, Some("127.0.0.1:4".parse().unwrap()));
    }

    #[test]
    fn push_and_retention_sections_become_their_settings() {
        let config = server_config(
            "[push]\nurl = \"http://127.0.0.1:9/push\"\npreview = \"text\"\nper_user_per_minute = 12\n\
             [retention]\nkeep_events = 100\n[retention.conversations.42]\nkeep_days = 2\n",
        )
        .unwrap();
        let push = config.push.unwrap();
        assert_eq!(
            push.hook,
            Hook::Http {
                url: "http://127.0.0.1:9/push".into()
            }
        );
        assert_eq!(push.preview, Preview::Text);
        assert_eq!(push.per_user_interval, Duration::from_secs(5));
        let conv = quip_protocol::ConversationId(42);
        assert_eq!(config.retention.default.keep_events, Some(100));
        assert_eq!(
            config.retention.of(conv).keep_for,
            Some(Duration::from_secs(2 * 86_400))
        );
        assert_eq!(config.retention.of(conv).keep_events, None);
        assert!(server_config("").unwrap().push.is_none());
        assert!(server_config("").unwrap().retention.default.is_off());
        let command = server_config("[push]\ncommand = [\"/bin/cat\", \"-\"]\n").unwrap();
        assert!(matches!(command.push.unwrap().hook, Hook::Command { .. }));
        assert_eq!(error_key("[push]\nurl = \"ftp://x\"\n"), "push.url");
        assert_eq!(
            error_key("[push]\nurl = \"http://x\"\ncommand = [\"a\"]\n"),
            "push.command"
        );
        assert_eq!(error_key("[push]\npreview = \"all\"\n"), "push.preview");
        assert_eq!(
            error_key("[retention.conversations.abc]\nkeep_days = 1\n"),
            "retention.conversations"
        );
    }

    #[test]
    fn every_range_is_checked_when_the_file_is_read() {
        for (text, key) in [
            (
                "[limits]\nidle_timeout_ms = 18446744073709551615\n",
                "limits.idle_timeout_ms",
            ),
            (
                "[limits]\nhandshake_timeout_ms = 86400001\n",
                "limits.handshake_timeout_ms",
            ),
            (
                "[limits]\npresence_grace_ms = 99999999999999999\n",
                "limits.presence_grace_ms",
            ),
            (
                "[limits]\ntyping_relay_interval_ms = 7000\n",
                "limits.typing_relay_interval_ms",
            ),
            (
                "[limits]\ndatagrams_in_per_sec = 0\n",
                "limits.datagrams_in_per_sec",
            ),
            (
                "[limits]\ndatagrams_out_burst = 0\n",
                "limits.datagrams_out_burst",
            ),
            ("cache_mb = 18446744073709551615\n", "cache_mb"),
            ("shutdown_timeout_ms = 86400001\n", "shutdown_timeout_ms"),
            (
                "[retention]\nkeep_days = 18446744073709551615\n",
                "retention.keep_days",
            ),
            (
                "[retention.conversations.42]\nkeep_days = 99999999\n",
                "retention.conversations",
            ),
            ("[push]\nretry_initial_ms = 0\n", "push.retry_initial_ms"),
            (
                "[push]\nretry_initial_ms = 5000\nretry_max_ms = 1000\n",
                "push.retry_max_ms",
            ),
            ("[push]\nqueue = 0\n", "push.queue"),
            ("[push]\ntimeout_ms = 86400001\n", "push.timeout_ms"),
        ] {
            assert_eq!(error_key(text), key, "{text}");
        }
        // The edges themselves are fine.
        server_config(
            "cache_mb = 1048576\n[limits]\nidle_timeout_ms = 86400000\npresence_grace_ms = 0\n\
             typing_relay_interval_ms = 2000\n[retention]\nkeep_days = 36500\n",
        )
        .unwrap();
    }

    #[test]
    fn a_range_error_names_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quipd.toml");
        std::fs::write(
            &path,
            "# comment\n[limits]\nmax_connections = 5\nidle_timeout_ms = 18446744073709551615\n",
        )
        .unwrap();
        let err = ConfigFile::load_server_config(&path, &Overrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "{}: line 4: `limits.idle_timeout_ms`: ",
                path.display()
            )),
            "{text}"
        );
        // A key the file does not set still names the file.
        std::fs::write(&path, "[tls]\ncert = \"/c.pem\"\n").unwrap();
        let err = ConfigFile::load_server_config(&path, &Overrides::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: `tls.key`: tls.cert is set, so tls.key must be too",
                path.display()
            )
        );
        let missing = dir.path().join("missing.toml");
        let err = ConfigFile::load_server_config(&missing, &Overrides::default()).unwrap_err();
        assert!(
            std::error::Error::source(&err).is_none(),
            "the OS error is told once"
        );
    }

    #[test]
    fn the_settings_name_every_key_of_the_example() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/quipd.toml");
        let (file, config) = ConfigFile::load_server_config(&path, &Overrides::default()).unwrap();
        let settings = settings(&file, &config);
        let keys: Vec<&str> = settings.iter().map(|(key, _)| key.as_str()).collect();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut table = String::new();
        let mut checked = 0;
        for line in text.lines().map(str::trim) {
            if let Some(header) = line.strip_prefix('[') {
                table = header.trim_end_matches(']').to_owned();
                continue;
            }
            let Some((name, _)) = line.split_once('=').filter(|_| !line.starts_with('#')) else {
                continue;
            };
            let name = name.trim();
            let key = if table.is_empty() {
                name.to_owned()
            } else {
                format!("{table}.{name}")
            };
            assert!(
                keys.contains(&key.as_str()),
                "{key} is not printed: {keys:?}"
            );
            checked += 1;
        }
        assert!(checked >= 36, "only {checked} keys in the example");
        let value = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(value("log.format"), "text");
        assert_eq!(value("limits.presence_grace_ms"), "15000");
        assert_eq!(value("shutdown_timeout_ms"), "10000");
    }
}
