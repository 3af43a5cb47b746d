//! `quip`: a command-line chat client built on quip-client.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use quip_client::{
    Client, ClientConfig, ClientError, ConversationId, EphemeralEvent, Event, EventBody, Position,
    PresenceInfo, Seq, StartAt, Subscription, TypingChange, TypingTracker, UserName,
};

/// Sends in flight at once when piping stdin into `quip send`.
const SEND_WINDOW: usize = 256;

#[derive(Parser, Debug)]
#[command(name = "quip", version, about = "Command-line client for quip")]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Connection {
    /// Server address, host:port.
    #[arg(
        long,
        global = true,
        env = "QUIP_SERVER",
        default_value = "127.0.0.1:4433"
    )]
    server: String,
    /// PEM file of the CA that signed the server's certificate.
    #[arg(
        long,
        global = true,
        env = "QUIP_CA",
        default_value = "./quip-data/certs/ca.pem"
    )]
    ca: PathBuf,
    /// Bearer token (from `quipd user add`).
    #[arg(long, global = true, env = "QUIP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Keep cursors and unacknowledged sends in this file, so that a restarted `quip` resumes
    /// where it stopped (`tail` without `--after` continues from the saved cursor).
    #[arg(long, global = true, env = "QUIP_STATE")]
    state: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Conversations: create, list, add or remove members.
    Conv {
        #[command(subcommand)]
        command: ConvCommand,
    },
    /// Send TEXT, or each line of stdin as one message (in order, pipelined); prints each seq.
    Send {
        conv: ConversationId,
        text: Option<String>,
    },
    /// Print a page of history in ascending seq order.
    History {
        conv: ConversationId,
        /// Only events before this seq.
        #[arg(long)]
        before: Option<u64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print events as they arrive.
    Tail {
        conv: ConversationId,
        /// Start after this seq (stored events first); without it, after the cursor saved in
        /// the --state file, or else only new events.
        #[arg(long)]
        after: Option<u64>,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Also print typing in this conversation and the presence of your contacts, as JSON
        /// lines: {"event":"typing"|"typing_stopped","conv":..,"user":..} and
        /// {"event":"presence","user":..,"state":..,"last_seen_ms":..}.
        #[arg(long)]
        events: bool,
    },
    /// Tell the other members you are typing, for a few seconds.
    Typing {
        conv: ConversationId,
        /// How long to keep announcing.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Load-test a server: quip bench send|latency|fanout|connections|replay|typing.
    Bench(quip_client::bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum ConvCommand {
    /// Create a conversation with you and the members; prints its id.
    Create {
        #[arg(long = "member")]
        members: Vec<UserName>,
        #[arg(long, default_value = "")]
        title: String,
    },
    /// List your conversations.
    List,
    /// Add a member (creator only).
    Add {
        conv: ConversationId,
        user: UserName,
    },
    /// Remove a member (the creator removes anyone, you can remove yourself).
    Remove {
        conv: ConversationId,
        user: UserName,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Diagnostics only when asked for (RUST_LOG=info shows reconnects); stdout stays clean.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quip: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(conn: &Connection) -> Result<Client, ClientError> {
    let token = conn.token.clone().ok_or_else(|| {
        ClientError::Config(
            "no token: pass --token or set QUIP_TOKEN (see `quipd user add`)".into(),
        )
    })?;
    let mut config = ClientConfig::from_ca_file(conn.server.clone(), &conn.ca, token)?;
    config.state_file = conn.state.clone();
    Client::connect(config).await
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    if let Command::Bench(args) = cli.command {
        // The load tool makes its own users and connections.
        return quip_client::bench::run(args, &cli.conn.server, &cli.conn.ca)
            .await
            .map(drop)
            .map_err(|e| ClientError::Config(format!("{e:#}")));
    }
    let client = connect(&cli.conn).await?;
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Conv { command } => match command {
            ConvCommand::Create { members, title } => {
                let conv = client.create_conversation(&title, &members).await?;
                out(&mut stdout, format_args!("{conv}"))?;
            }
            ConvCommand::List => {
                for c in client.conversations().await? {
                    let members: Vec<&str> = c.members.iter().map(|m| m.as_str()).collect();
                    out(
                        &mut stdout,
                        format_args!(
                            "{}\t{}\thead={}\t{}",
                            c.conv,
                            c.title,
                            c.head,
                            members.join(",")
                        ),
                    )?;
                }
            }
            ConvCommand::Add { conv, user } => {
                let seq = client.add_member(conv, user).await?;
                out(&mut stdout, format_args!("{seq}"))?;
            }
            ConvCommand::Remove { conv, user } => {
                let seq = client.remove_member(conv, user).await?;
                out(&mut stdout, format_args!("{seq}"))?;
            }
        },
        Command::Send {
            conv,
            text: Some(text),
        } => {
            let sent = client.send(conv, text).await?;
            out(&mut stdout, format_args!("{}", sent.seq))?;
        }
        Command::Send { conv, text: None } => send_lines(&client, conv, &mut stdout).await?,
        Command::History {
            conv,
            before,
            limit,
            json,
        } => {
            let (events, _head) = client.history(conv, before.map(Seq), limit).await?;
            for event in &events {
                print_event(&mut stdout, conv, event, json)?;
            }
        }
        Command::Tail {
            conv,
            after,
            count,
            json,
            events,
        } => {
            let start = match (after, client.saved_position(conv)) {
                (Some(seq), _) => StartAt::After(Position {
                    epoch: client.epoch(),
                    seq: Seq(seq),
                }),
                (None, Some(saved)) => StartAt::After(saved),
                (None, None) => StartAt::Latest,
            };
            // Listening starts before subscribing, so no datagram falls in between.
            let ephemeral = events.then(|| client.ephemeral_events());
            let mut subscription = client.subscribe(conv, start).await?;
            match ephemeral {
                Some(ephemeral) => {
                    let tail = Tail {
                        client: &client,
                        conv,
                        json,
                        count,
                    };
                    tail.run(&mut subscription, ephemeral, &mut stdout).await?;
                }
                None => {
                    let mut printed = 0;
                    while count.is_none_or(|n| printed < n) {
                        match subscription.next().await {
                            Some(Ok(event)) => {
                                print_event(&mut stdout, conv, &event, json)?;
                                printed += 1;
                            }
                            Some(Err(e)) => return Err(e),
                            None => break,
                        }
                    }
                }
            }
        }
        Command::Bench(_) => unreachable!("handled before connecting"),
        Command::Typing { conv, seconds } => {
            let until = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < until {
                client.typing(conv)?;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            client.stop_typing(conv)?;
            // Closing at once could discard the stop before it leaves (receivers would still
            // expire the indicator by its TTL).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(stdout);
    client.close().await;
    Ok(())
}

/// Sends each stdin line as a message, keeping up to `SEND_WINDOW` unacknowledged; prints the
/// seqs in line order.
async fn send_lines(
    client: &Client,
    conv: ConversationId,
    stdout: &mut impl Write,
) -> Result<(), ClientError> {
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(SEND_WINDOW);
    // Stdin is read on a blocking thread so a slow pipe never stalls the connection.
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
        Ok(())
    });
    let mut in_flight = VecDeque::with_capacity(SEND_WINDOW);
    loop {
        if in_flight.len() >= SEND_WINDOW {
            let oldest: tokio::task::JoinHandle<Result<quip_client::Sent, ClientError>> =
                in_flight.pop_front().expect("window is full");
            let sent = oldest.await.map_err(join_error)??;
            out(stdout, format_args!("{}", sent.seq))?;
            continue;
        }
        match lines.recv().await {
            // Queued now, so the server sees the lines in order.
            Some(line) => in_flight.push_back(tokio::spawn(client.send(conv, line))),
            None => break,
        }
    }
    while let Some(sent) = in_flight.pop_front() {
        let sent = sent.await.map_err(join_error)??;
        out(stdout, format_args!("{}", sent.seq))?;
    }
    reader
        .await
        .map_err(join_error)?
        .map_err(|e| ClientError::Config(format!("reading stdin: {e}")))
}

/// `quip tail --events`: messages as usual, plus typing and presence as JSON lines.
struct Tail<'a> {
    client: &'a Client,
    conv: ConversationId,
    json: bool,
    count: Option<u64>,
}

impl Tail<'_> {
    async fn run(
        &self,
        subscription: &mut Subscription,
        mut ephemeral: quip_client::EphemeralEvents,
        stdout: &mut impl Write,
    ) -> Result<(), ClientError> {
        let mut typing = TypingTracker::new();
        let mut presence = std::collections::HashMap::new();
        // A snapshot first (datagrams may be lost), then again now and then to correct drift.
        let refresh = Duration::from_millis(quip_client::limits::PRESENCE_REFRESH_MS);
        let mut next_refresh = tokio::time::Instant::now();
        let mut printed = 0;
        while self.count.is_none_or(|n| printed < n) {
            let expiry = typing.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                event = subscription.next() => match event {
                    Some(Ok(event)) => {
                        if let EventBody::Message { .. } = event.body {
                            if let Some(change) = typing.handle_message(self.conv, &event.sender) {
                                print_typing(stdout, &change)?;
                            }
                        }
                        print_event(stdout, self.conv, &event, self.json)?;
                        printed += 1;
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                },
                event = ephemeral.next() => match event {
                    Some(EphemeralEvent::Presence(info)) => {
                        print_presence(stdout, &info, &mut presence)?;
                    }
                    Some(event) => {
                        let change = typing.handle_event(&event, Instant::now());
                        if let Some(change) = change.filter(|c| typing_conv(c) == self.conv) {
                            print_typing(stdout, &change)?;
                        }
                    }
                    None => break,
                },
                () = sleep_until(expiry) => {
                    for change in typing.handle_timeout(Instant::now()) {
                        if typing_conv(&change) == self.conv {
                            print_typing(stdout, &change)?;
                        }
                    }
                }
                () = tokio::time::sleep_until(next_refresh) => {
                    next_refresh += refresh;
                    for info in self.client.presence().await? {
                        print_presence(stdout, &info, &mut presence)?;
                    }
                }
            }
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn typing_conv(change: &TypingChange) -> ConversationId {
    match change {
        TypingChange::Started { conv, .. } | TypingChange::Stopped { conv, .. } => *conv,
    }
}

fn print_typing(stdout: &mut impl Write, change: &TypingChange) -> Result<(), ClientError> {
    let (event, conv, user) = match change {
        TypingChange::Started { conv, user } => ("typing", conv, user),
        TypingChange::Stopped { conv, user } => ("typing_stopped", conv, user),
    };
    let line = serde_json::json!({ "event": event, "conv": conv.0, "user": user.as_str() });
    out(stdout, format_args!("{line}"))
}

/// Prints a presence line when it says something new about the user (a snapshot repeats what
/// datagrams already said; an older version is stale).
fn print_presence(
    stdout: &mut impl Write,
    info: &PresenceInfo,
    known: &mut std::collections::HashMap<UserName, PresenceInfo>,
) -> Result<(), ClientError> {
    if let Some(previous) = known.get(&info.user) {
        if info.version < previous.version || info.state == previous.state {
            return Ok(());
        }
    }
    known.insert(info.user.clone(), info.clone());
    let line = serde_json::json!({
        "event": "presence",
        "user": info.user.as_str(),
        "state": info.state.as_str(),
        "last_seen_ms": info.last_seen_ms,
    });
    out(stdout, format_args!("{line}"))
}

fn join_error(e: tokio::task::JoinError) -> ClientError {
    ClientError::Protocol(format!("internal task failed: {e}"))
}

fn out(stdout: &mut impl Write, line: std::fmt::Arguments<'_>) -> Result<(), ClientError> {
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| ClientError::Config(format!("writing output: {e}")))
}

fn print_event(
    stdout: &mut impl Write,
    conv: ConversationId,
    event: &Event,
    json: bool,
) -> Result<(), ClientError> {
    if json {
        let mut line = serde_json::json!({
            "conv": conv.0,
            "seq": event.seq.0,
            "sender": event.sender.as_str(),
            "at_ms": event.at_ms,
        });
        let fields = match &event.body {
            EventBody::Message { id, text } => serde_json::json!({
                "type": "message", "id": id.to_string(), "text": text,
            }),
            EventBody::Created { title, members } => serde_json::json!({
                "type": "created", "title": title,
                "members": members.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            }),
            EventBody::MemberAdded { user } => {
                serde_json::json!({ "type": "member_added", "user": user.as_str() })
            }
            EventBody::MemberRemoved { user } => {
                serde_json::json!({ "type": "member_removed", "user": user.as_str() })
            }
            EventBody::Unsupported { kind } => {
                serde_json::json!({ "type": "unsupported", "kind": kind })
            }
        };
        if let (Some(line), Some(fields)) = (line.as_object_mut(), fields.as_object()) {
            line.extend(fields.clone());
        }
        return out(stdout, format_args!("{line}"));
    }
    let (seq, who) = (event.seq, &event.sender);
    match &event.body {
        EventBody::Message { text, .. } => out(stdout, format_args!("{seq} {who}: {text}")),
        EventBody::Created { title, members } => {
            let members: Vec<&str> = members.iter().map(|m| m.as_str()).collect();
            out(
                stdout,
                format_args!(
                    "{seq} * {who} created {title:?} with {}",
                    members.join(", ")
                ),
            )
        }
        EventBody::MemberAdded { user } => out(stdout, format_args!("{seq} * {who} added {user}")),
        EventBody::MemberRemoved { user } => {
            out(stdout, format_args!("{seq} * {who} removed {user}"))
        }
        EventBody::Unsupported { kind } => out(
            stdout,
            format_args!("{seq} * (an event of kind {kind}, too new for this client)"),
        ),
    }
}
