//! Command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::logging::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "Trellis sidecar: a decentralized service mesh agent"
)]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TRELLIS_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a sidecar.
    Run {
        /// Sidecar configuration (YAML). `TRELLIS_*` environment variables override fields.
        #[arg(long, short, env = "TRELLIS_CONFIG")]
        config: PathBuf,
    },
    /// Certificate authority and workload certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Run a demo mesh on this machine: two services with two instances each, plus a client.
    Demo {
        /// Stop after this many seconds and exit non-zero if any request failed.
        #[arg(long)]
        duration: Option<u64>,
        /// Requests per second sent by the demo client.
        #[arg(long, default_value_t = 10)]
        rate: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a CA (`ca.pem`, `ca-key.pem`) for a trust domain.
    Init {
        #[arg(long, default_value = trellis_proxy::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Directory for the CA files.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// CA validity, e.g. `365d`.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        validity: Duration,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue a short-lived certificate for a service (`<service>.pem`, `<service>-key.pem`).
    Issue {
        #[arg(long)]
        service: String,
        /// Directory holding the CA.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Where to write the certificate (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity, e.g. `24h`.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// Parse arguments, run the command, map the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    logging::init(cli.log_format, default_filter);
    match execute(cli.command) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn execute(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Run { config } => {
            let cfg = trellis_proxy::config::Config::load(&config).map_err(|e| e.to_string())?;
            runtime()?
                .block_on(crate::run::run(cfg))
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cert {
            command:
                CertCommand::Init {
                    trust_domain,
                    dir,
                    validity,
                    force,
                },
        } => {
            crate::cert::init(&trust_domain, &dir, validity, force).map_err(|e| e.to_string())?;
            println!(
                "created CA for trust domain {trust_domain}: {}",
                dir.join("ca.pem").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cert {
            command:
                CertCommand::Issue {
                    service,
                    dir,
                    out,
                    ttl,
                },
        } => {
            let out = out.unwrap_or_else(|| dir.clone());
            let id = crate::cert::issue(&dir, &service, ttl, &out).map_err(|e| e.to_string())?;
            println!(
                "issued {id} valid for {}: {}",
                humantime::format_duration(ttl),
                out.join(format!("{service}.pem")).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { duration, rate } => {
            let ok = runtime()?
                .block_on(crate::demo::run(duration.map(Duration::from_secs), rate))
                .map_err(|e| e.to_string())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
