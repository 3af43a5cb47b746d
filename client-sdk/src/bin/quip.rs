//! `quip`: a command-line chat client built on quip-client.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use quip_client::{
    Client, ClientConfig, ClientError, ConversationId, EphemeralEvent, Event, EventBody,
    MessageState, Origin, Position, PresenceInfo, Receipt, Seq, StartAt, Subscription,
    TypingChange, TypingTracker, Update, UserName,
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
    /// Bearer token (from `quipd user add` or `quipd token issue`).
    #[arg(long, global = true, env = "QUIP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client certificate (PEM, from `quipd certs client`) that identifies this device instead
    /// of a token; needs --key.
    #[arg(long, global = true, env = "QUIP_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "QUIP_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Keep cursors and unacknowledged sends in this file, so that a restarted `quip` resumes
    /// where it stopped (`tail` without `--after` continues from the saved cursor). One file per
    /// device: each device resumes on its own cursors.
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
        /// Send TEXT as a reply to the message at this seq.
        #[arg(long, requires = "text")]
        reply_to: Option<u64>,
    },
    /// Mark everything up to SEQ as read (your other devices and the other members see it).
    Read { conv: ConversationId, seq: u64 },
    /// Replace the text of your message at SEQ; prints the seq of the edit.
    Edit {
        conv: ConversationId,
        seq: u64,
        text: String,
    },
    /// Delete the message at SEQ for everyone (yours, or any if you created the conversation);
    /// prints the seq of the delete.
    Delete { conv: ConversationId, seq: u64 },
    /// React to the message at SEQ with EMOJI (or take the reaction back with --remove); prints
    /// the seq of the reaction.
    React {
        conv: ConversationId,
        seq: u64,
        emoji: String,
        #[arg(long)]
        remove: bool,
    },
    /// Print a page of history in ascending seq order, each message with its current state
    /// (latest text, deleted, reactions).
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
        /// {"event":"presence","user":..,"state":..,"last_seen_ms":..}; receipts too.
        #[arg(long)]
        events: bool,
        /// Also print receipt changes (who has what delivered and read: the ticks), as lines
        /// `✓ USER delivered=N read=M`, or with --json
        /// {"event":"receipt","conv":..,"user":..,"delivered":..,"read":..}.
        #[arg(long)]
        receipts: bool,
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
    /// List your conversations: id, title, head, members and your unread count.
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
    let mut config = match (&conn.cert, &conn.key, &conn.token) {
        (Some(cert), Some(key), _) => {
            ClientConfig::from_ca_file(conn.server.clone(), &conn.ca, "")?
                .with_client_certificate(cert, key)?
        }
        (_, _, Some(token)) => {
            ClientConfig::from_ca_file(conn.server.clone(), &conn.ca, token.clone())?
        }
        _ => return Err(ClientError::Config(
            "no token: pass --token or set QUIP_TOKEN (see `quipd user add`), or --cert and --key"
                .into(),
        )),
    };
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
                for entry in client.inbox().await? {
                    let c = &entry.summary;
                    let members: Vec<&str> = c.members.iter().map(|m| m.as_str()).collect();
                    out(
                        &mut stdout,
                        format_args!(
                            "{}\t{}\thead={}\t{}\tunread={}\tread={}\tdelivered={}",
                            c.conv,
                            c.title,
                            c.head,
                            members.join(","),
                            entry.unread,
                            entry.read,
                            entry.delivered,
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
            reply_to,
        } => {
            let sent = match reply_to {
                Some(to) => client.reply(conv, Seq(to), text).await?,
                None => client.send(conv, text).await?,
            };
            out(&mut stdout, format_args!("{}", sent.seq))?;
        }
        Command::Send {
            conv, text: None, ..
        } => send_lines(&client, conv, &mut stdout).await?,
        Command::Read { conv, seq } => {
            let receipt = client.mark_read(conv, Seq(seq)).await?;
            out(
                &mut stdout,
                format_args!("read={} delivered={}", receipt.read, receipt.delivered),
            )?;
        }
        Command::Edit { conv, seq, text } => {
            let sent = client.edit(conv, Seq(seq), text).await?;
            out(&mut stdout, format_args!("{}", sent.seq))?;
        }
        Command::Delete { conv, seq } => {
            let sent = client.delete(conv, Seq(seq)).await?;
            out(&mut stdout, format_args!("{}", sent.seq))?;
        }
        Command::React {
            conv,
            seq,
            emoji,
            remove,
        } => {
            let sent = if remove {
                client.unreact(conv, Seq(seq), emoji).await?
            } else {
                client.react(conv, Seq(seq), emoji).await?
            };
            out(&mut stdout, format_args!("{}", sent.seq))?;
        }
        Command::History {
            conv,
            before,
            limit,
            json,
        } => {
            let page = match client.page(conv, before.map(Seq), limit).await {
                Ok(page) => page,
                Err(ClientError::Pruned { oldest, .. }) => {
                    eprintln!("quip: retention removed the events before seq {oldest}");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if page.oldest > Seq(1) && page.events.first().map(|e| e.seq) == Some(page.oldest) {
                eprintln!(
                    "quip: the oldest event still stored is seq {}; retention removed older ones",
                    page.oldest
                );
            }
            let mut states = page.states.iter().peekable();
            for event in &page.events {
                let state = states.next_if(|s| s.seq == event.seq);
                print_event(&mut stdout, conv, event, json, state, None)?;
            }
            if page.events.is_empty() && page.oldest > Seq(1) {
                eprintln!(
                    "quip: nothing stored before seq {}: retention removed older events",
                    page.oldest
                );
            }
        }
        Command::Tail {
            conv,
            after,
            count,
            json,
            events,
            receipts,
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
            let mut subscription = match client.subscribe(conv, start).await {
                Err(ClientError::Pruned { oldest, .. }) => {
                    // Not a silent gap: say what is gone, then follow what is still there.
                    eprintln!(
                        "quip: retention removed the events before seq {oldest}; following from there"
                    );
                    let from = StartAt::After(Position {
                        epoch: client.epoch(),
                        seq: Seq(oldest.0.saturating_sub(1)),
                    });
                    client.subscribe(conv, from).await?
                }
                other => other?,
            };
            let tail = Tail {
                client: &client,
                conv,
                json,
                count,
                receipts: receipts || events,
            };
            match ephemeral {
                Some(ephemeral) => tail.run(&mut subscription, ephemeral, &mut stdout).await?,
                None => tail.run_plain(&mut subscription, &mut stdout).await?,
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

/// `quip tail`: events as they come, with `--receipts` the receipt changes, with `--events`
/// also typing and presence as JSON lines.
struct Tail<'a> {
    client: &'a Client,
    conv: ConversationId,
    json: bool,
    count: Option<u64>,
    receipts: bool,
}

impl Tail<'_> {
    /// Prints an update; says whether it was an event (what `--count` counts).
    fn print(&self, stdout: &mut impl Write, update: &Update) -> Result<bool, ClientError> {
        match update {
            Update::Event { event, origin } => {
                print_event(stdout, self.conv, event, self.json, None, Some(*origin))?;
                Ok(true)
            }
            Update::Receipt(receipt) => {
                if self.receipts {
                    print_receipt(stdout, self.conv, receipt, self.json)?;
                }
                Ok(false)
            }
        }
    }

    async fn run_plain(
        &self,
        subscription: &mut Subscription,
        stdout: &mut impl Write,
    ) -> Result<(), ClientError> {
        let mut printed = 0;
        while self.count.is_none_or(|n| printed < n) {
            match subscription.next_update().await {
                Some(Ok(update)) => {
                    if self.print(stdout, &update)? {
                        printed += 1;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(())
    }

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
                update = subscription.next_update() => match update {
                    Some(Ok(update)) => {
                        if let Update::Event { event, .. } = &update {
                            if event.body.is_message() {
                                if let Some(change) = typing.handle_message(self.conv, &event.sender) {
                                    print_typing(stdout, &change)?;
                                }
                            }
                        }
                        if self.print(stdout, &update)? {
                            printed += 1;
                        }
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

fn print_receipt(
    stdout: &mut impl Write,
    conv: ConversationId,
    receipt: &Receipt,
    json: bool,
) -> Result<(), ClientError> {
    if json {
        let line = serde_json::json!({
            "event": "receipt",
            "conv": conv.0,
            "user": receipt.user.as_str(),
            "delivered": receipt.delivered.0,
            "read": receipt.read.0,
        });
        return out(stdout, format_args!("{line}"));
    }
    out(
        stdout,
        format_args!(
            "✓ {} delivered={} read={}",
            receipt.user, receipt.delivered, receipt.read
        ),
    )
}

/// One event line. `state` is the message's current state (history); `origin` says who sent
/// it as this client sees it (tail).
fn print_event(
    stdout: &mut impl Write,
    conv: ConversationId,
    event: &Event,
    json: bool,
    state: Option<&MessageState>,
    origin: Option<Origin>,
) -> Result<(), ClientError> {
    // A message's text as it is now: the latest edit's, or nothing once deleted.
    let current = |text: &str| -> String {
        match state {
            Some(s) if s.deleted.is_some() => String::new(),
            Some(MessageState {
                text: Some(edited), ..
            }) => edited.clone(),
            _ => text.to_owned(),
        }
    };
    if json {
        let mut line = serde_json::json!({
            "conv": conv.0,
            "seq": event.seq.0,
            "sender": event.sender.as_str(),
            "at_ms": event.at_ms,
        });
        let mut fields = match &event.body {
            EventBody::Message { id, text } => serde_json::json!({
                "type": "message", "id": id.to_string(), "text": current(text),
            }),
            EventBody::Reply { id, text, reply_to } => serde_json::json!({
                "type": "reply", "id": id.to_string(), "text": current(text),
                "reply_to": reply_to.0,
            }),
            EventBody::Edited { id, target, text } => serde_json::json!({
                "type": "edited", "id": id.to_string(), "target": target.0, "text": text,
            }),
            EventBody::Deleted { id, target } => serde_json::json!({
                "type": "deleted", "id": id.to_string(), "target": target.0,
            }),
            EventBody::ReactionAdded { id, target, emoji } => serde_json::json!({
                "type": "reaction_added", "id": id.to_string(), "target": target.0,
                "emoji": emoji,
            }),
            EventBody::ReactionRemoved { id, target, emoji } => serde_json::json!({
                "type": "reaction_removed", "id": id.to_string(), "target": target.0,
                "emoji": emoji,
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
        if let (Some(state), Some(fields)) = (state, fields.as_object_mut()) {
            if let Some(edited) = state.edited {
                fields.insert("edited".into(), edited.0.into());
            }
            if let Some(deleted) = state.deleted {
                fields.insert("deleted".into(), deleted.0.into());
            }
            if !state.reactions.is_empty() {
                let reactions: serde_json::Map<String, serde_json::Value> = state
                    .reactions
                    .iter()
                    .map(|r| {
                        let users: Vec<&str> = r.users.iter().map(|u| u.as_str()).collect();
                        (r.emoji.clone(), users.into())
                    })
                    .collect();
                fields.insert("reactions".into(), reactions.into());
            }
        }
        if let (Some(origin), Some(fields)) = (origin, fields.as_object_mut()) {
            let origin = match origin {
                Origin::ThisDevice => "this_device",
                Origin::OtherDevice => "other_device",
                Origin::Someone => "other",
            };
            fields.insert("origin".into(), origin.into());
        }
        if let (Some(line), Some(fields)) = (line.as_object_mut(), fields.as_object()) {
            line.extend(fields.clone());
        }
        return out(stdout, format_args!("{line}"));
    }
    let (seq, who) = (event.seq, &event.sender);
    // How a message looks now: "(deleted)", or its text, "(edited)", its reactions.
    let decorate = |text: &str| -> String {
        if state.is_some_and(|s| s.deleted.is_some()) {
            return "(deleted)".into();
        }
        let mut shown = current(text);
        if state.is_some_and(|s| s.edited.is_some()) {
            shown.push_str(" (edited)");
        }
        for reaction in state.map(|s| s.reactions.as_slice()).unwrap_or_default() {
            let users: Vec<&str> = reaction.users.iter().map(|u| u.as_str()).collect();
            shown.push_str(&format!(" [{} {}]", reaction.emoji, users.join(",")));
        }
        shown
    };
    match &event.body {
        EventBody::Message { text, .. } => {
            out(stdout, format_args!("{seq} {who}: {}", decorate(text)))
        }
        EventBody::Reply { text, reply_to, .. } => out(
            stdout,
            format_args!("{seq} {who} (reply to {reply_to}): {}", decorate(text)),
        ),
        EventBody::Edited { target, text, .. } => out(
            stdout,
            format_args!("{seq} * {who} edited {target}: {text}"),
        ),
        EventBody::Deleted { target, .. } => {
            out(stdout, format_args!("{seq} * {who} deleted {target}"))
        }
        EventBody::ReactionAdded { target, emoji, .. } => out(
            stdout,
            format_args!("{seq} * {who} reacted {emoji} to {target}"),
        ),
        EventBody::ReactionRemoved { target, emoji, .. } => out(
            stdout,
            format_args!("{seq} * {who} took back {emoji} on {target}"),
        ),
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
