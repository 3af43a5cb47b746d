//! `quipd`: serve, and administer users.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use quipd::admin::{self, AdminRequest, AdminResponse};
use quipd::{Server, ServerConfig};

#[derive(Parser, Debug)]
#[command(name = "quipd", version, about = "The quip messaging daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Data directory: the store, certificates and the admin socket.
        #[arg(long, default_value = "./quip-data", env = "QUIPD_DATA")]
        data: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:4433", env = "QUIPD_LISTEN")]
        listen: SocketAddr,
        /// sled page cache size in MiB.
        #[arg(long, default_value_t = 64)]
        cache_mb: u64,
        /// Log lines as JSON instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create a user and print its bearer token on one line.
    Add {
        name: String,
        #[arg(long, default_value = "./quip-data", env = "QUIPD_DATA")]
        data: PathBuf,
    },
    /// List users, one per line.
    List {
        #[arg(long, default_value = "./quip-data", env = "QUIPD_DATA")]
        data: PathBuf,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quipd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            data,
            listen,
            cache_mb,
            log_json,
        } => {
            init_logging(log_json);
            let mut config = ServerConfig::new(data, listen);
            config.cache_bytes = cache_mb * 1024 * 1024;
            let server = Server::bind(&config).await?;
            server.run(shutdown_signal()).await;
            Ok(())
        }
        Command::User { command } => {
            init_logging(false);
            let (data, request) = match command {
                UserCommand::Add { name, data } => (data, AdminRequest::UserAdd { name }),
                UserCommand::List { data } => (data, AdminRequest::UserList),
            };
            match admin::run(&data, request).await? {
                AdminResponse::UserAdded { token, .. } => println!("{token}"),
                AdminResponse::Users { users } => users.iter().for_each(|u| println!("{u}")),
                AdminResponse::Error { message } => anyhow::bail!(message),
            }
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
