//! `quip`: a command-line chat client built on quip-client.
//!
//! What other people wrote is printed through [`Shown`], so that it cannot forge lines or
//! drive the terminal; `--json` output is JSON's own escaping.

#[path = "quip/lines.rs"]
mod lines;
#[path = "quip/shown.rs"]
mod shown;

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use quip_client::{
    limits, Client, ClientConfig, ClientError, ConversationId, EphemeralEvent, Event, EventBody,
    MessageState, Origin, Position, PresenceInfo, Receipt, Resumed, Seq, StartAt, Status,
    Subscription, TypingChange, TypingTracker, Update, UserName,
};

use lines::{read_lines, Failures, Line};
use shown::Shown;

/// Sends in flight at once when piping stdin into `quip send`.
const SEND_WINDOW: usize = 256;
/// A connection silent this long is lost (keep-alives go every third of it): short, so that a
/// server that died is noticed soon, and the give-up time counts from there.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Give up after this many seconds without progress once connected (the connection lost
    /// and not back, or the server answering UNAVAILABLE): an error and a non-zero exit. A
    /// silent server is taken for lost after 10 s. Unacknowledged sends stay in the --state
    /// file.
    #[arg(
        long,
        global = true,
        env = "QUIP_GIVE_UP_AFTER",
        value_name = "SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    give_up_after: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Conversations: create, list, add or remove members.
    Conv {
        #[command(subcommand)]
        command: ConvCommand,
    },
    /// Send TEXT, or each line of stdin as one message (in order, pipelined); prints each
    /// stored line's seq. A line that is refused (too long, not UTF-8) is named on stderr with
    /// the reason and the others still go; the exit status is 1 if any line was not stored.
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
        /// Events on the page, 1 to 1000.
        #[arg(
            long,
            default_value_t = 50,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::MAX_HISTORY_LIMIT))
        )]
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
        /// Also print typing in this conversation and the presence of your contacts, and
        /// receipts: lines `* USER is typing`, `* USER stopped typing`, `* USER is online`, or
        /// with --json {"event":"typing"|"typing_stopped","conv":..,"user":..} and
        /// {"event":"presence","user":..,"state":..,"last_seen_ms":..}.
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
        /// How long to keep announcing, 1 to 3600.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
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

fn main() -> ExitCode {
    let cli = parse_args();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("quip: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A stdin reader still blocked on a pipe nobody closes must not hold up the exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            // Not `eprintln!`: with both outputs on one closed pipe (`quip ... 2>&1 | head`)
            // the error itself cannot be written, which is no reason to panic.
            let _ = writeln!(std::io::stderr(), "quip: {}", Shown(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line. The usage line of each command is the one its help shows: clap
/// would otherwise list every option given, through the environment too (`QUIP_TOKEN`...), in
/// the usage of an error, as if it were required.
fn parse_args() -> Cli {
    let mut command = Cli::command();
    command.build();
    freeze_usage(&mut command);
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn freeze_usage(command: &mut clap::Command) {
    let usage = command.render_usage().to_string();
    let usage = usage.trim_start_matches("Usage:").trim().to_owned();
    *command = std::mem::take(command).override_usage(usage);
    for sub in command.get_subcommands_mut() {
        freeze_usage(sub);
    }
}

/// Diagnostics only when asked for (RUST_LOG=info shows reconnects); stdout stays clean.
fn init_logging() {
    let Ok(value) = std::env::var("RUST_LOG") else {
        return;
    };
    if value.trim().is_empty() {
        return;
    }
    match tracing_subscriber::EnvFilter::builder().parse(&value) {
        Ok(filter) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        Err(e) => eprintln!(
            "quip: ignoring RUST_LOG={}: {}",
            Shown(&value),
            Shown(&e.to_string())
        ),
    }
}

async fn connect(conn: &Connection) -> Result<Client, ClientError> {
    let with_ca = |token: &str| {
        ClientConfig::from_ca_file(conn.server.clone(), &conn.ca, token).map_err(|e| {
            ClientError::Config(format!(
                "{e} (--ca or QUIP_CA names the daemon's DATA/certs/ca.pem)"
            ))
        })
    };
    let mut config = match (&conn.cert, &conn.key, &conn.token) {
        (Some(cert), Some(key), _) => with_ca("")?.with_client_certificate(cert, key)?,
        (_, _, Some(token)) => with_ca(token)?,
        _ => return Err(ClientError::Config(
            "no token: pass --token or set QUIP_TOKEN (see `quipd user add`), or --cert and --key"
                .into(),
        )),
    };
    config.state_file = conn.state.clone();
    config.give_up_after = Some(Duration::from_secs(conn.give_up_after));
    config.idle_timeout = IDLE_TIMEOUT;
    Client::connect(config).await.map_err(|e| match e {
        ClientError::Connect { server, reason } if reason.contains("UnknownIssuer") => {
            ClientError::Connect {
                server,
                reason: format!(
                    "{reason} (the server's certificate is not signed by the CA in {}; \
                     --ca or QUIP_CA names the daemon's DATA/certs/ca.pem)",
                    conn.ca.display()
                ),
            }
        }
        other => other,
    })
}

/// The exit status of a command stopped by Ctrl-C, as shells report SIGINT.
const INTERRUPTED: u8 = 130;

async fn run(cli: Cli) -> Result<ExitCode, ClientError> {
    if let Command::Bench(args) = cli.command {
        // The load tool makes its own users and connections.
        return quip_client::bench::run(args, &cli.conn.server, &cli.conn.ca)
            .await
            .map(|_| ExitCode::SUCCESS)
            .map_err(|e| ClientError::Config(format!("{e:#}")));
    }
    let client = connect(&cli.conn).await?;
    let status = tokio::spawn(report_status(client.status(), cli.conn.give_up_after));
    let resumed = client.resumed_sends();
    let resumed = (!resumed.is_empty()).then(|| {
        let file = cli.conn.state.clone().unwrap_or_default();
        tokio::spawn(settle_resumed(resumed, file))
    });
    // Ctrl-C (how `quip tail` is usually stopped) closes the connection like the end of a
    // command does, so that the server ends the session at once instead of at its idle
    // timeout; what was not acknowledged stays in the state file.
    let result = tokio::select! {
        result = command(&client, cli.command) => result,
        _ = tokio::signal::ctrl_c() => {
            status.abort();
            client.close().await;
            return Ok(ExitCode::from(INTERRUPTED));
        }
    };
    // The sends an earlier run left are part of this run: wait for them (bounded by the
    // give-up time), then say what became of them.
    let resumed_ok = match resumed {
        Some(task) => task.await.unwrap_or(false),
        None => true,
    };
    status.abort();
    client.close().await;
    result?;
    if resumed_ok {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(ClientError::Config(
            "sends left in the state file by an earlier run failed (see above)".into(),
        ))
    }
}

/// Tells on stderr how the link is doing, once per change: lost (reconnecting), the server
/// unavailable, back.
async fn report_status(mut status: tokio::sync::watch::Receiver<Status>, give_up_after: u64) {
    let kind = |s: &Status| std::mem::discriminant(s);
    let mut shown = kind(&status.borrow_and_update());
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().clone();
        if kind(&now) == shown {
            continue;
        }
        shown = kind(&now);
        match now {
            Status::Connected => eprintln!("quip: connected again"),
            Status::Reconnecting { error } => {
                let why = match error {
                    ClientError::ConnectionLost(reason) => reason,
                    other => other.to_string(),
                };
                eprintln!(
                    "quip: connection lost ({}); reconnecting, for up to {give_up_after} s",
                    Shown(&why)
                )
            }
            Status::Unavailable { error } => eprintln!(
                "quip: the server cannot serve now: {}; retrying, for up to {give_up_after} s",
                Shown(&ClientError::Server(error).to_string())
            ),
            Status::Closed { .. } => return,
        }
    }
}

/// Waits for the sends an earlier run left in the state file and tells what became of them on
/// stderr; false if any failed.
async fn settle_resumed(resumed: Vec<Resumed>, file: PathBuf) -> bool {
    let file = file.display();
    let mut stored: BTreeMap<ConversationId, (Seq, Seq, usize)> = BTreeMap::new();
    let mut ok = true;
    for send in resumed {
        let (conv, len) = (send.entry.conv, send.entry.text.len());
        match send.outcome().await {
            Ok(sent) => {
                let (first, last, count) = stored.entry(conv).or_insert((sent.seq, sent.seq, 0));
                *first = (*first).min(sent.seq);
                *last = (*last).max(sent.seq);
                *count += 1;
            }
            Err(e) => {
                ok = false;
                let fate = match &e {
                    ClientError::GaveUp { .. } | ClientError::ConnectionLost(_) => {
                        "it stays in the state file"
                    }
                    _ => "it was dropped from the state file",
                };
                eprintln!(
                    "quip: a send of {len} bytes to conversation {conv} left in {file} by an \
                     earlier run failed: {}; {fate}",
                    Shown(&e.to_string())
                );
            }
        }
    }
    for (conv, (first, last, count)) in stored {
        let seqs = if first == last {
            format!("seq {first}")
        } else {
            format!("seqs {first} to {last}")
        };
        eprintln!(
            "quip: {count} unacknowledged sends to conversation {conv} left in {file} by an \
             earlier run are stored ({seqs})"
        );
    }
    ok
}

async fn command(client: &Client, command: Command) -> Result<(), ClientError> {
    let mut stdout = std::io::stdout().lock();
    match command {
        Command::Conv { command } => match command {
            ConvCommand::Create { members, title } => {
                let conv = client.create_conversation(&title, &members).await?;
                out(&mut stdout, format_args!("{conv}"))?;
            }
            ConvCommand::List => {
                for entry in client.inbox().await? {
                    let c = &entry.summary;
                    let members: Vec<String> = c
                        .members
                        .iter()
                        .map(|m| Shown(m.as_str()).to_string())
                        .collect();
                    out(
                        &mut stdout,
                        format_args!(
                            "{}\t{}\thead={}\t{}\tunread={}\tread={}\tdelivered={}",
                            c.conv,
                            Shown(&c.title),
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
        } => send_lines(client, conv, &mut stdout).await?,
        Command::Read { conv, seq } => {
            let receipt = client.mark_read(conv, Seq(seq)).await?;
            if receipt.read > Seq(seq) {
                eprintln!(
                    "quip: the read cursor is already at {}; it only moves forward",
                    receipt.read
                );
            }
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
            let tail = Tail {
                client,
                conv,
                json,
                count,
                receipts: receipts || events,
            };
            // Listening starts before subscribing, so no datagram falls in between.
            let mut ephemeral = events.then(|| client.ephemeral_events());
            let mut printed = 0;
            let mut subscription = follow(client, conv, after).await?;
            loop {
                let ended = match &mut ephemeral {
                    Some(ephemeral) => {
                        tail.run(&mut subscription, ephemeral, &mut stdout, &mut printed)
                            .await
                    }
                    None => {
                        tail.run_plain(&mut subscription, &mut stdout, &mut printed)
                            .await
                    }
                };
                match ended {
                    // SPEC 9.1 item 8: the cursor is from another store; start over.
                    Err(ClientError::CursorReset { epoch, head }) => {
                        drop(subscription);
                        eprintln!(
                            "quip: the server's store was replaced while following conversation \
                             {conv} (restored from a backup: now epoch {epoch}, last seq {head}); \
                             following it again from the start"
                        );
                        subscription = subscribe_from(client, conv, StartAt::Beginning).await?;
                    }
                    other => break other?,
                }
            }
        }
        Command::Bench(_) => unreachable!("handled before connecting"),
        Command::Typing { conv, seconds } => {
            // A typing datagram to a conversation one is not in is dropped without a word by
            // the server: ask first, so that a wrong id is an error.
            client.history(conv, None, 1).await?;
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
    Ok(())
}

/// Subscribes `quip tail` where it starts: after `--after`, after the cursor of the state file,
/// or at the latest event. A saved cursor the server resets (the store was restored from a
/// backup, SPEC 9.1 item 8) is said so, and the conversation followed from the start; an
/// `--after` past the end is an error.
async fn follow(
    client: &Client,
    conv: ConversationId,
    after: Option<u64>,
) -> Result<Subscription, ClientError> {
    let saved = client.saved_position(conv);
    let start = match (after, saved) {
        (Some(seq), _) => StartAt::After(Position {
            epoch: client.epoch(),
            seq: Seq(seq),
        }),
        (None, Some(saved)) => StartAt::After(saved),
        (None, None) => StartAt::Latest,
    };
    match subscribe_from(client, conv, start).await {
        Err(ClientError::CursorReset { epoch, head }) => match (after, saved) {
            (Some(seq), _) => Err(ClientError::Config(format!(
                "--after {seq} is past the end of conversation {conv}: its last seq is {head}"
            ))),
            (None, Some(saved)) => {
                if saved.epoch != epoch {
                    eprintln!(
                        "quip: the cursor saved for conversation {conv} (seq {}) is from before \
                         the server's store was replaced (restored from a backup: epoch {} then, \
                         {epoch} now); following it from the start",
                        saved.seq, saved.epoch
                    );
                } else {
                    eprintln!(
                        "quip: the cursor saved for conversation {conv} (seq {}) is past its end \
                         (last seq {head}); following it from the start",
                        saved.seq
                    );
                }
                subscribe_from(client, conv, StartAt::Beginning).await
            }
            (None, None) => Err(ClientError::CursorReset { epoch, head }),
        },
        other => other,
    }
}

/// Subscribes from `start`; if retention removed events there, says so and follows from the
/// oldest still stored.
async fn subscribe_from(
    client: &Client,
    conv: ConversationId,
    start: StartAt,
) -> Result<Subscription, ClientError> {
    match client.subscribe(conv, start).await {
        Err(ClientError::Pruned { oldest, .. }) => {
            // Not a silent gap: say what is gone, then follow what is still there.
            eprintln!(
                "quip: retention removed the events before seq {oldest}; following from there"
            );
            let from = StartAt::After(Position {
                epoch: client.epoch(),
                seq: Seq(oldest.0.saturating_sub(1)),
            });
            client.subscribe(conv, from).await
        }
        other => other,
    }
}

/// Sends each stdin line as a message, keeping up to `SEND_WINDOW` unacknowledged. Prints the
/// seq of every stored line on stdout, in line order, and every line that was not stored on
/// stderr with its number and the reason. A refused line (too long, not UTF-8) does not stop
/// the others; once the client gives up (no connection, or the server unavailable, for the
/// give-up time) no further line is read. Fails if any line was not stored.
async fn send_lines(
    client: &Client,
    conv: ConversationId,
    stdout: &mut impl Write,
) -> Result<(), ClientError> {
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<Line>(SEND_WINDOW);
    // Stdin is read on a blocking thread so a slow pipe never stalls the connection.
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        read_lines(std::io::stdin().lock(), |line| {
            lines_tx.blocking_send(line).is_ok()
        })
    });
    type Outcome = tokio::task::JoinHandle<Result<quip_client::Sent, ClientError>>;
    let mut in_flight: VecDeque<(u64, Result<Outcome, String>)> =
        VecDeque::with_capacity(SEND_WINDOW);
    let mut failures = Failures::default();
    let (mut total, mut last_read) = (0u64, 0u64);
    let (mut input_done, mut gave_up) = (false, false);
    loop {
        // A line refused before it was sent settles as soon as it is the oldest.
        if let Some((number, Err(reason))) = in_flight.front() {
            let outcome = Err(ClientError::Config(reason.clone()));
            settle_line(stdout, &mut failures, *number, outcome)?;
            in_flight.pop_front();
            continue;
        }
        let read = !input_done && !gave_up && in_flight.len() < SEND_WINDOW;
        if in_flight.is_empty() && !read {
            break;
        }
        // The oldest send settles as soon as it is answered, so that seqs show as they come
        // and giving up is noticed while stdin is silent.
        let oldest = async {
            match in_flight.front_mut() {
                Some((_, Ok(task))) => task.await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            outcome = oldest => {
                let outcome = outcome.map_err(join_error)?;
                gave_up |= matches!(outcome, Err(ClientError::GaveUp { .. }));
                if let Some((number, _)) = in_flight.pop_front() {
                    settle_line(stdout, &mut failures, number, outcome)?;
                }
            }
            line = lines.recv(), if read => match line {
                Some(Line { number, text }) => {
                    total += 1;
                    last_read = number;
                    // Queued now, so the server sees the lines in order.
                    let outcome = text.map(|text| tokio::spawn(client.send(conv, text)));
                    in_flight.push_back((number, outcome));
                }
                None => input_done = true,
            },
        }
    }
    drop(lines);
    if let Some(report) = failures.finish() {
        eprintln!("quip: {}", Shown(&report));
    }
    if gave_up && !input_done {
        // The reader may be waiting on a pipe that stays open: it is left behind.
        eprintln!("quip: the lines after line {last_read} were not read");
    } else {
        let read = reader.await.map_err(join_error)?;
        read.map_err(|e| ClientError::Config(format!("reading stdin: {e}")))?;
    }
    if failures.count > 0 {
        return Err(ClientError::Config(format!(
            "{} of the {total} lines read were not stored",
            failures.count
        )));
    }
    Ok(())
}

/// Prints what became of one line: its seq on stdout, or (grouped with the failures next to it)
/// its number and the reason on stderr.
fn settle_line(
    stdout: &mut impl Write,
    failures: &mut Failures,
    number: u64,
    outcome: Result<quip_client::Sent, ClientError>,
) -> Result<(), ClientError> {
    match outcome {
        Ok(sent) => {
            if let Some(report) = failures.stored() {
                eprintln!("quip: {}", Shown(&report));
            }
            out(stdout, format_args!("{}", sent.seq))
        }
        Err(e) => {
            if let Some(report) = failures.failed(number, e.to_string()) {
                eprintln!("quip: {}", Shown(&report));
            }
            Ok(())
        }
    }
}

/// `quip tail`: events as they come, with `--receipts` the receipt changes, with `--events`
/// also typing and presence.
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

    /// Prints until `--count` events were printed (counted in `printed`, across
    /// subscriptions) or the subscription ends.
    async fn run_plain(
        &self,
        subscription: &mut Subscription,
        stdout: &mut impl Write,
        printed: &mut u64,
    ) -> Result<(), ClientError> {
        while self.count.is_none_or(|n| *printed < n) {
            match subscription.next_update().await {
                Some(Ok(update)) => {
                    if self.print(stdout, &update)? {
                        *printed += 1;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        Ok(())
    }

    /// [`Tail::run_plain`], with typing and presence.
    async fn run(
        &self,
        subscription: &mut Subscription,
        ephemeral: &mut quip_client::EphemeralEvents,
        stdout: &mut impl Write,
        printed: &mut u64,
    ) -> Result<(), ClientError> {
        let mut typing = TypingTracker::new();
        let mut presence = std::collections::HashMap::new();
        // A snapshot first (datagrams may be lost), then again now and then to correct drift.
        let refresh = Duration::from_millis(quip_client::limits::PRESENCE_REFRESH_MS);
        let mut next_refresh = tokio::time::Instant::now();
        while self.count.is_none_or(|n| *printed < n) {
            let expiry = typing.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                update = subscription.next_update() => match update {
                    Some(Ok(update)) => {
                        if let Update::Event { event, .. } = &update {
                            if event.body.is_message() {
                                if let Some(change) = typing.handle_message(self.conv, &event.sender) {
                                    print_typing(stdout, &change, self.json)?;
                                }
                            }
                        }
                        if self.print(stdout, &update)? {
                            *printed += 1;
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                },
                event = ephemeral.next() => match event {
                    Some(EphemeralEvent::Presence(info)) => {
                        print_presence(stdout, &info, &mut presence, self.json)?;
                    }
                    Some(event) => {
                        let change = typing.handle_event(&event, Instant::now());
                        if let Some(change) = change.filter(|c| typing_conv(c) == self.conv) {
                            print_typing(stdout, &change, self.json)?;
                        }
                    }
                    None => break,
                },
                () = sleep_until(expiry) => {
                    for change in typing.handle_timeout(Instant::now()) {
                        if typing_conv(&change) == self.conv {
                            print_typing(stdout, &change, self.json)?;
                        }
                    }
                }
                () = tokio::time::sleep_until(next_refresh) => {
                    next_refresh += refresh;
                    for info in self.client.presence().await? {
                        print_presence(stdout, &info, &mut presence, self.json)?;
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

fn print_typing(
    stdout: &mut impl Write,
    change: &TypingChange,
    json: bool,
) -> Result<(), ClientError> {
    let (event, conv, user, text) = match change {
        TypingChange::Started { conv, user } => ("typing", conv, user, "is typing"),
        TypingChange::Stopped { conv, user } => ("typing_stopped", conv, user, "stopped typing"),
    };
    if !json {
        return out(stdout, format_args!("* {} {text}", Shown(user.as_str())));
    }
    let line = serde_json::json!({ "event": event, "conv": conv.0, "user": user.as_str() });
    out(stdout, format_args!("{line}"))
}

/// Prints a presence line when it says something new about the user (a snapshot repeats what
/// datagrams already said; an older version is stale).
fn print_presence(
    stdout: &mut impl Write,
    info: &PresenceInfo,
    known: &mut std::collections::HashMap<UserName, PresenceInfo>,
    json: bool,
) -> Result<(), ClientError> {
    if let Some(previous) = known.get(&info.user) {
        if info.version < previous.version || info.state == previous.state {
            return Ok(());
        }
    }
    known.insert(info.user.clone(), info.clone());
    if !json {
        let (user, state) = (Shown(info.user.as_str()), info.state.as_str());
        return out(stdout, format_args!("* {user} is {state}"));
    }
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
            Shown(receipt.user.as_str()),
            receipt.delivered,
            receipt.read
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
    let (seq, who) = (event.seq, Shown(event.sender.as_str()));
    // How a message looks now: "(deleted)", or its text, "(edited)", its reactions.
    // A replayed event of a deleted message has an empty text (no message is sent empty).
    let decorate = |text: &str| -> String {
        if text.is_empty() || state.is_some_and(|s| s.deleted.is_some()) {
            return "(deleted)".into();
        }
        let mut shown = Shown(&current(text)).to_string();
        if state.is_some_and(|s| s.edited.is_some()) {
            shown.push_str(" (edited)");
        }
        for reaction in state.map(|s| s.reactions.as_slice()).unwrap_or_default() {
            let users: Vec<String> = reaction
                .users
                .iter()
                .map(|u| Shown(u.as_str()).to_string())
                .collect();
            shown.push_str(&format!(
                " [{} {}]",
                Shown(&reaction.emoji),
                users.join(",")
            ));
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
        EventBody::Edited { target, text, .. } if text.is_empty() => out(
            stdout,
            format_args!("{seq} * {who} edited {target}: (deleted)"),
        ),
        EventBody::Edited { target, text, .. } => out(
            stdout,
            format_args!("{seq} * {who} edited {target}: {}", Shown(text)),
        ),
        EventBody::Deleted { target, .. } => {
            out(stdout, format_args!("{seq} * {who} deleted {target}"))
        }
        EventBody::ReactionAdded { target, emoji, .. } => out(
            stdout,
            format_args!("{seq} * {who} reacted {} to {target}", Shown(emoji)),
        ),
        EventBody::ReactionRemoved { target, emoji, .. } => out(
            stdout,
            format_args!("{seq} * {who} took back {} on {target}", Shown(emoji)),
        ),
        EventBody::Created { title, members } => {
            let members: Vec<String> = members
                .iter()
                .map(|m| Shown(m.as_str()).to_string())
                .collect();
            out(
                stdout,
                format_args!(
                    "{seq} * {who} created \"{}\" with {}",
                    Shown(title),
                    members.join(", ")
                ),
            )
        }
        EventBody::MemberAdded { user } => out(
            stdout,
            format_args!("{seq} * {who} added {}", Shown(user.as_str())),
        ),
        EventBody::MemberRemoved { user } if *user == event.sender => {
            out(stdout, format_args!("{seq} * {who} left"))
        }
        EventBody::MemberRemoved { user } => out(
            stdout,
            format_args!("{seq} * {who} removed {}", Shown(user.as_str())),
        ),
        EventBody::Unsupported { kind } => out(
            stdout,
            format_args!("{seq} * (an event of kind {kind}, too new for this client)"),
        ),
    }
}
