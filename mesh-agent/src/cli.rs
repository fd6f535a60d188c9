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
    /// Policies stored in etcd.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Services, instances, lease TTLs and the revision each sidecar has applied.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
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
pub enum PolicyCommand {
    /// Validate and write policy documents (one transaction per apply).
    Apply {
        /// A YAML file (several documents separated by `---`) or a directory of them.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Validate and show what would change, without writing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Validate policy documents without contacting etcd.
    Validate {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print a stored policy as YAML.
    Get {
        /// KIND/NAME, e.g. ServicePolicy/payments
        reference: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// List stored policies.
    List {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete a stored policy.
    Delete {
        /// KIND/NAME
        reference: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// How the CLI reaches etcd.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        env = "TRELLIS_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    #[arg(long, env = "TRELLIS_ETCD_PREFIX", default_value = trellis_proxy::config::DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,
    /// CA bundle for TLS to etcd.
    #[arg(long, env = "TRELLIS_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS to etcd (with --etcd-key).
    #[arg(long, env = "TRELLIS_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TRELLIS_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    #[arg(long, env = "TRELLIS_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    #[arg(long, env = "TRELLIS_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// Timeout of each etcd call.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: Duration,
}

impl EtcdArgs {
    pub fn config(&self) -> trellis_proxy::config::EtcdConfig {
        let mut c = trellis_proxy::config::EtcdConfig::new(self.etcd_endpoints.clone());
        c.prefix = self.etcd_prefix.clone();
        c.ca = self.etcd_ca.clone();
        c.cert = self.etcd_cert.clone();
        c.key = self.etcd_key.clone();
        c.username = self.etcd_user.clone();
        c.password = self.etcd_password.clone();
        c.timeout = self.etcd_timeout;
        c
    }
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
        Command::Policy { command } => policy(command),
        Command::Status { etcd } => {
            let out = runtime()?
                .block_on(crate::policy::status(&etcd.config()))
                .map_err(|e| e.to_string())?;
            print!("{out}");
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

fn policy(command: PolicyCommand) -> Result<ExitCode, String> {
    use crate::policy as p;
    let lines = match command {
        PolicyCommand::Validate { file } => {
            let docs = p::load_documents(&file).map_err(|e| e.to_string())?;
            docs.iter().map(|d| format!("{} valid", d.id())).collect()
        }
        PolicyCommand::Apply {
            file,
            dry_run,
            etcd,
        } => {
            let docs = p::load_documents(&file).map_err(|e| e.to_string())?;
            runtime()?
                .block_on(p::apply(&etcd.config(), &docs, dry_run))
                .map_err(|e| e.to_string())?
        }
        PolicyCommand::Get { reference, etcd } => {
            vec![runtime()?
                .block_on(p::get(&etcd.config(), &reference))
                .map_err(|e| e.to_string())?]
        }
        PolicyCommand::List { etcd } => runtime()?
            .block_on(p::list(&etcd.config()))
            .map_err(|e| e.to_string())?,
        PolicyCommand::Delete { reference, etcd } => {
            vec![runtime()?
                .block_on(p::delete(&etcd.config(), &reference))
                .map_err(|e| e.to_string())?]
        }
    };
    for l in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}
