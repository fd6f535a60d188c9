//! Command line.

/// `print!`/`println!` that do not panic when stdout is a closed pipe
/// (`mesh-agent status | head -1`): the output is simply cut, as with any Unix tool.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

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
        /// `ingress`: an edge gateway; the configuration must have an `ingress` section (TLS
        /// listener, certificates). A sidecar may have one too.
        #[arg(long, value_enum, default_value_t = RunMode::Sidecar, env = "TRELLIS_MODE")]
        mode: RunMode,
        /// Worker threads (1 to 64; default: the CPUs this process may run on). With 1, the
        /// sidecar runs on one thread (tokio's current-thread scheduler). Set it from the
        /// container's CPU limit: a CPU quota is not visible to the default.
        #[arg(long, env = "TRELLIS_WORKERS", value_parser = crate::runtime::parse_workers)]
        workers: Option<usize>,
    },
    /// Certificate authority and workload certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// The response caches of a service's sidecars (docs/caching.md).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
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
        /// Wait until every live instance has applied the latest mesh change (exit 0), or
        /// until --timeout passes (exit 1): for scripts and CI pipelines after `policy apply`.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// A web dashboard of the whole mesh (topology, services, instances, consumers) and its
    /// JSON API: instances from etcd, their telemetry over mTLS (the sidecars must list this
    /// dashboard's identity in `telemetry.readers`). Stateless: run one or several.
    Dashboard {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Where the UI and API listen. Anything but loopback needs --token-file.
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: std::net::SocketAddr,
        /// The dashboard's identity: `<dir>/<name>.pem`, `<dir>/<name>-key.pem` and
        /// `<dir>/ca.pem`, as `mesh-agent cert issue --service <name>` writes them.
        #[arg(long)]
        identity_dir: PathBuf,
        /// The dashboard's service name in its SPIFFE ID.
        #[arg(long, default_value = "dashboard")]
        name: String,
        #[arg(long, default_value = trellis_proxy::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How often every instance is read.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Instances read at once.
        #[arg(long, default_value_t = crate::dashboard::DEFAULT_CONCURRENCY)]
        concurrency: usize,
        /// A file whose first line is the token the UI and API require.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Where alerts go (`--alertmanager`, `--webhook`) and the TLS of https ones.
        #[command(flatten)]
        alerts: Box<AlertArgs>,
        /// TTL of the alert evaluator's lease: how long alerts go unevaluated when the
        /// evaluating dashboard dies.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        evaluator_ttl: Duration,
    },
    /// OpenAPI documents of the mesh's services, stored in etcd once per content hash
    /// (docs/api-specs.md).
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
    /// Alert rules and their state (firing, pending, inactive), as the evaluating dashboard
    /// keeps them in etcd.
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// API usage per consumer, per route and per service, read from sidecars' and gateways'
    /// `/metrics` (their admin addresses).
    Report {
        /// Admin addresses (`host:port`), comma-separated: the sidecars this host reaches.
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "dashboard",
            conflicts_with = "dashboard"
        )]
        targets: Vec<String>,
        /// A dashboard's URL (`http://host:9900`): every instance of the mesh, on any host, and
        /// each service's uptime over 24 h with the intervals down.
        #[arg(long)]
        dashboard: Option<String>,
        /// The dashboard's token (first line of the file).
        #[arg(long, requires = "dashboard")]
        token_file: Option<PathBuf>,
        /// Measure over this window (two scrapes this far apart, e.g. `60s`); without it,
        /// totals since each process started.
        #[arg(long, value_parser = humantime::parse_duration)]
        window: Option<Duration>,
        #[arg(long, short, value_enum, default_value_t = crate::usage::ReportFormat::Table)]
        output: crate::usage::ReportFormat,
    },
    /// Generate an API key for a consumer: prints the key (give it to the client, once) and
    /// the SHA-256 digest to put in the `Consumer` policy (never the key itself).
    Apikey {
        /// The key's label in the Consumer policy (`api_keys[].id`).
        #[arg(long, default_value = "key-1")]
        id: String,
    },
    /// The developer portal's consumer accounts (docs/portal.md): invites, approvals.
    Consumer {
        #[command(subcommand)]
        command: ConsumerCommand,
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
    /// The demo's app on its own (for container examples): answers with its name and the
    /// caller identity its sidecar verified, after calling `--call` through the sidecar.
    DemoApp {
        /// Where the app listens (its sidecar's `inbound.app`).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Name in responses (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// A service to call for each request, `SERVICE` or `SERVICE/PATH`.
        #[arg(long)]
        call: Option<String>,
        /// The sidecar's outbound listener, through which `--call` goes.
        #[arg(long, default_value = trellis_proxy::config::DEFAULT_OUTBOUND_ADDR)]
        outbound: std::net::SocketAddr,
    },
    /// Wait until the sidecar's admin `/ready` answers 200, then exit 0 (or run the command given
    /// after `--`). Exit 1 if not ready before the timeout. For app entrypoints and health checks.
    WaitReady {
        /// The sidecar's admin address (a wildcard address is dialed on loopback).
        #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = trellis_proxy::config::DEFAULT_ADMIN_ADDR)]
        admin: std::net::SocketAddr,
        /// Give up after this long (`0s`: probe once).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Pause between probes.
        #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Replace this process with the command once ready, e.g. `-- /app/server --port 8080`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// etcd administration: least-privilege roles and users.
    Etcd {
        #[command(subcommand)]
        command: EtcdCommand,
    },
    /// Transparent interception: iptables rules redirecting the app's traffic to the sidecar.
    Iptables {
        #[command(subcommand)]
        command: IptablesCommand,
    },
    /// Add the sidecar to the workloads of a Kubernetes manifest (YAML or JSON; Deployment,
    /// StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod, List) and print it. Options come
    /// from these flags or from `trellis.dev/*` annotations on the pod template.
    Inject {
        /// The manifest, `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        options: Box<crate::inject::options::Options>,
    },
    /// The sidecar injector: a mutating admission webhook (AdmissionReview v1 over HTTPS)
    /// answering pod creations with the JSONPatch `inject` would make. Stateless: run several.
    Injector {
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// PEM certificate (chain) the API server verifies against the webhook's caBundle;
        /// re-read when it changes.
        #[arg(long, default_value = "/etc/trellis-injector/tls.crt")]
        tls_cert: PathBuf,
        #[arg(long, default_value = "/etc/trellis-injector/tls.key")]
        tls_key: PathBuf,
        #[command(flatten)]
        options: Box<crate::inject::options::Options>,
    },
    /// Remove what `inject` added, restoring the workloads exactly.
    Uninject {
        /// The manifest, `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
}

/// The dashboard's alert destinations. Boxed in [`Command`]: they would make its
/// `Dashboard` variant much larger than the others.
#[derive(clap::Args, Debug)]
pub struct AlertArgs {
    /// Alertmanager base URL (`http://host:9093` or `https://...`), repeatable: alerts of
    /// the `AlertRule` policies go to its v2 API.
    #[arg(long)]
    alertmanager: Vec<String>,
    /// A URL (`http://` or `https://`) receiving one JSON object per alert state change
    /// (firing, resolved).
    #[arg(long)]
    webhook: Option<String>,
    /// PEM CA bundle that https alert destinations must chain to, instead of the public
    /// roots compiled in (a private CA, or the system's bundle file).
    #[arg(long)]
    alert_ca_file: Option<PathBuf>,
    /// PEM certificate (chain) presented to https alert destinations (mTLS to
    /// Alertmanager); needs --alert-client-key.
    #[arg(long)]
    alert_client_cert: Option<PathBuf>,
    /// PEM private key of --alert-client-cert.
    #[arg(long)]
    alert_client_key: Option<PathBuf>,
}

impl AlertArgs {
    fn notify(self) -> crate::dashboard::alerts::Notify {
        crate::dashboard::alerts::Notify {
            alertmanagers: self.alertmanager,
            webhook: self.webhook,
            ca_file: self.alert_ca_file,
            client_cert: self.alert_client_cert,
            client_key: self.alert_client_key,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum EtcdCommand {
    /// Print (default) or apply the etcd role and user of one service's sidecars
    /// (`trellis-service-<S>`, user `<S>`: write only S's own keys, read the mesh), or of an
    /// operator (`trellis-operator`: read and write the whole prefix). See docs/etcd.md,
    /// "Least privilege".
    #[command(group(clap::ArgGroup::new("who").required(true).args(["service", "operator"])))]
    Rbac {
        /// The service whose sidecars get the role; the etcd user has the service's name.
        #[arg(long)]
        service: Option<String>,
        /// An operator's etcd user name, to get `trellis-operator`.
        #[arg(long)]
        operator: Option<String>,
        /// Also let the service's sidecars store their app's OpenAPI document (`api_spec:`):
        /// readwrite on the shared `apis/specs/` prefix and on its own `apis/index/<S>/`.
        #[arg(long)]
        api_specs: bool,
        /// Create or update the role and user in etcd (as etcd's root user) instead of
        /// printing etcdctl commands.
        #[arg(long)]
        apply: bool,
        /// The user's password, first line of this file. Without it the user has no password
        /// and logs in with a client certificate whose common name is the user.
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum IptablesCommand {
    /// Install (or refresh) the redirect rules in the current network namespace.
    Install {
        #[command(flatten)]
        rules: IptablesArgs,
        /// Print the `iptables-restore` input instead of applying it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove the rules and chains installed by `install`; nothing installed is not an error.
    Remove {
        /// Print the commands instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The knobs of `mesh-agent iptables install`.
#[derive(clap::Args, Debug, Clone)]
pub struct IptablesArgs {
    /// The UID the sidecar runs as; its own connections are never redirected.
    #[arg(long, default_value_t = crate::iptables::DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Also exempt connections from this GID.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Where inbound TCP is redirected (the sidecar's `inbound.listen` port).
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Where the app's outbound TCP is redirected (the sidecar's `outbound.listen` port).
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The admin port, never redirected (health probes reach it directly).
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// Capture outbound traffic only.
    #[arg(long)]
    pub no_inbound: bool,
    /// Inbound ports left alone, comma-separated (e.g. an app port probed by the kubelet).
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (e.g. server-speaks-first protocols such as MySQL).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks left alone, `ip/prefix`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
}

impl IptablesArgs {
    pub fn rules(&self) -> crate::iptables::Rules {
        crate::iptables::Rules {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            inbound: !self.no_inbound,
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    Sidecar,
    Ingress,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Drop cached responses on every sidecar of a service: one etcd record, applied by each
    /// from its watch. Everything of the service without a selector.
    Purge {
        #[arg(long)]
        service: String,
        /// Paths starting with this prefix (any query).
        #[arg(long, conflicts_with_all = ["key", "tag"])]
        prefix: Option<String>,
        /// One path with its query, exactly (`/items?page=2`).
        #[arg(long, conflicts_with = "tag")]
        key: Option<String>,
        /// Responses that named this tag in `Surrogate-Key`.
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        author: AuthorArg,
        #[command(flatten)]
        etcd: EtcdArgs,
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
        author: AuthorArg,
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
        author: AuthorArg,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Who changed a policy, when, and how (a diff per change), oldest first.
    History {
        /// KIND/NAME
        reference: String,
        #[arg(long, short, value_enum, default_value_t = crate::policy::OutputFormat::Table)]
        output: crate::policy::OutputFormat,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Restore a policy as a history entry left it (validated again, recorded as a change).
    Rollback {
        /// KIND/NAME
        reference: String,
        /// A revision listed by `policy history` for this policy.
        #[arg(long)]
        to_revision: i64,
        /// Check the target and show the diff that would be written, without writing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        author: AuthorArg,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// Who a policy change is recorded under.
#[derive(clap::Args, Debug, Clone)]
pub struct AuthorArg {
    /// Recorded in the policy's history; default: $USER, $LOGNAME or the uid.
    #[arg(long, env = "TRELLIS_POLICY_AUTHOR")]
    pub author: Option<String>,
}

impl AuthorArg {
    pub fn resolve(&self) -> String {
        match self.author.as_deref().map(str::trim) {
            Some(a) if !a.is_empty() => a.to_string(),
            _ => crate::policy::history::default_author(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ConsumerCommand {
    /// Make an invite to sign up on the portal: printed once, stored as a digest, used once.
    Invite {
        /// Bind the account to this existing Consumer (default: a new one named after it).
        #[arg(long)]
        consumer: Option<String>,
        /// How long the invite works.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A note for the operators (who it is for).
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Let an account that signed up without an invite sign in.
    Approve {
        email: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Refuse an account's sign-ins (its keys stay until revoked in its Consumer policy).
    Suspend {
        email: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete an account (its Consumer policy and keys stay).
    Remove {
        email: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Every portal account: email, state, consumer.
    Accounts {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApiCommand {
    /// Validate and store OpenAPI documents: `ApiSpec` policy documents, or with --service and
    /// --version one bare OpenAPI document (JSON or YAML).
    Put {
        /// A YAML file of `ApiSpec` documents, or an OpenAPI document with --service/--version.
        file: PathBuf,
        #[arg(long, requires = "version")]
        service: Option<String>,
        #[arg(long, requires = "service")]
        version: Option<String>,
        /// Validate and show what would be stored, without writing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Every stored API version: service, version, content hash, sizes and title.
    List {
        #[arg(long, short, value_enum, default_value_t = crate::policy::OutputFormat::Table)]
        output: crate::policy::OutputFormat,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Print a stored OpenAPI document (JSON).
    Get {
        service: String,
        /// Default: the version written most recently.
        #[arg(long)]
        version: Option<String>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// The APIs an ingress gateway exposes, as its consumers see them: paths mapped through
    /// the HTTPRoutes bound to it (matches, methods, prefix rewrites), its public URL as the
    /// server, its authentication as security schemes. One combined OpenAPI document, or one
    /// service's with --service. What cannot be shown (regex matches) is noted on stderr.
    Public {
        /// The ingress's service name, as HTTPRoute `gateways` name it.
        #[arg(long)]
        gateway: String,
        /// The URL consumers call; `https://<route host>` when unset.
        #[arg(long)]
        public_url: Option<String>,
        #[arg(long)]
        service: Option<String>,
        /// The combined document's title.
        #[arg(long, default_value = "APIs")]
        title: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete one version of a service's API (--version), or every version (--all); then the
    /// stored documents no version names any more. Refused while an HTTPRoute validates with
    /// a deleted version, unless --force.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["version", "all"])))]
    Delete {
        service: String,
        #[arg(long)]
        version: Option<String>,
        /// Every version of the service.
        #[arg(long)]
        all: bool,
        /// Delete even when an HTTPRoute's `validation` names the version.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete the stored documents that no service version names (left by an interrupted
    /// delete, or by a delete that raced a put).
    Gc {
        /// List what would be deleted, without deleting.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// What changed between two versions, breaking changes flagged and listed first.
    Diff {
        service: String,
        from: String,
        to: String,
        #[arg(long, short, value_enum, default_value_t = crate::policy::OutputFormat::Table)]
        output: crate::policy::OutputFormat,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum AlertsCommand {
    /// Every alert rule with its state, value and since when.
    List {
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
    #[arg(long, env = "TRELLIS_ETCD_PREFIX", default_value = crate::config::DEFAULT_ETCD_PREFIX)]
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
    pub fn config(&self) -> crate::config::EtcdConfig {
        let mut c = crate::config::EtcdConfig::new(self.etcd_endpoints.clone());
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
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Keep an existing CA and succeed (for setup jobs that run at every start).
        #[arg(long)]
        if_missing: bool,
    },
    /// Issue a short-lived certificate for a service (`<service>.pem`, `<service>-key.pem`).
    Issue {
        /// One or more services, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        service: Vec<String>,
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
    crate::runtime::for_command().map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn execute(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Run {
            config,
            mode,
            workers,
        } => {
            let cfg = crate::config::AgentConfig::load(&config).map_err(|e| e.to_string())?;
            if mode == RunMode::Ingress && cfg.proxy.ingress.is_none() {
                return Err(format!(
                    "{}: --mode ingress needs an `ingress` section (listen, certificates)",
                    config.display()
                ));
            }
            #[cfg(target_os = "linux")]
            {
                let listeners = 2 + u64::from(cfg.proxy.ingress.is_some());
                let max = cfg.proxy.limits.max_connections as u64;
                crate::nofile::raise_and_report(crate::nofile::needed(listeners, max));
            }
            let workers = crate::runtime::workers(workers);
            tracing::info!(workers, "starting the runtime");
            crate::runtime::for_agent(workers)
                .map_err(|e| format!("cannot start the async runtime ({workers} workers): {e}"))?
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
                    if_missing,
                },
        } => {
            if if_missing && dir.join("ca.pem").exists() {
                outln!("keeping the existing CA: {}", dir.join("ca.pem").display());
                return Ok(ExitCode::SUCCESS);
            }
            crate::cert::init(&trust_domain, &dir, validity, force).map_err(|e| e.to_string())?;
            outln!(
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
            for service in service {
                let id =
                    crate::cert::issue(&dir, &service, ttl, &out).map_err(|e| e.to_string())?;
                outln!(
                    "issued {id} valid for {}: {}",
                    humantime::format_duration(ttl),
                    out.join(format!("{service}.pem")).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy { command } => policy(command),
        Command::Status {
            etcd, wait: false, ..
        } => {
            let out = runtime()?
                .block_on(crate::policy::status(&etcd.config()))
                .map_err(|e| e.to_string())?;
            out!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            etcd,
            wait: true,
            timeout,
        } => {
            let (out, converged) = runtime()?
                .block_on(crate::policy::status_wait(&etcd.config(), timeout))
                .map_err(|e| e.to_string())?;
            out!("{out}");
            if converged {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "not converged within {}",
                    humantime::format_duration(timeout)
                );
                Ok(ExitCode::from(1))
            }
        }
        Command::WaitReady {
            admin,
            timeout,
            interval,
            command,
        } => wait_ready(admin, timeout, interval, command),
        Command::Iptables { command } => iptables(command),
        Command::Inject { file, options } => {
            crate::inject::cli::run(&file, crate::inject::manifest::Mode::Inject(&options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Injector {
            listen,
            tls_cert,
            tls_key,
            options,
        } => {
            let cfg = crate::inject::webhook::InjectorConfig {
                listen,
                cert: tls_cert,
                key: tls_key,
                reload_interval: trellis_proxy::config::DEFAULT_RELOAD_INTERVAL,
                options: *options,
            };
            runtime()?.block_on(injector(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninject { file } => {
            crate::inject::cli::run(&file, crate::inject::manifest::Mode::Uninject)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Etcd { command } => etcd(command),
        Command::DemoApp {
            listen,
            name,
            call,
            outbound,
        } => {
            let upstream = call.map(|c| {
                let (service, path) = c.split_once('/').unwrap_or((c.as_str(), ""));
                crate::demo_app::Upstream {
                    outbound,
                    service: service.to_string(),
                    path: format!("/{path}"),
                }
            });
            let name = name.unwrap_or_else(crate::run::hostname);
            runtime()?
                .block_on(crate::demo_app::run(listen, name, upstream))
                .map_err(|e| format!("demo app on {listen}: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dashboard {
            etcd,
            listen,
            identity_dir,
            name,
            trust_domain,
            interval,
            concurrency,
            token_file,
            alerts,
            evaluator_ttl,
        } => {
            let token = match token_file {
                Some(f) => Some(first_line(&f)?),
                None => None,
            };
            let cfg = crate::dashboard::DashboardConfig {
                listen,
                etcd: etcd.config(),
                identity_dir,
                name,
                trust_domain,
                interval,
                concurrency,
                fetch_timeout: crate::dashboard::DEFAULT_FETCH_TIMEOUT,
                token,
                notify: alerts.notify(),
                evaluator_ttl,
            };
            runtime()?.block_on(async {
                let running = crate::dashboard::start(cfg)
                    .await
                    .map_err(|e| e.to_string())?;
                eprintln!("dashboard on http://{}/", running.addr);
                let _ = tokio::signal::ctrl_c().await;
                Ok::<_, String>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Api { command } => {
            let out = runtime()?
                .block_on(crate::api::execute(command))
                .map_err(|e| e.to_string())?;
            out!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache {
            command:
                CacheCommand::Purge {
                    service,
                    prefix,
                    key,
                    tag,
                    author,
                    etcd,
                },
        } => {
            let purge = crate::cache_purge::Purge {
                service,
                prefix,
                key,
                tag,
            };
            let lines = runtime()?
                .block_on(purge.write(&etcd.config(), &author.resolve()))
                .map_err(|e| e.to_string())?;
            for l in lines {
                outln!("{l}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Alerts {
            command: AlertsCommand::List { etcd },
        } => {
            let out = runtime()?
                .block_on(crate::dashboard::alerts::list(&etcd.config()))
                .map_err(|e| e.to_string())?;
            out!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            targets,
            dashboard,
            token_file,
            window,
            output,
        } => {
            let source = match dashboard {
                Some(url) => crate::usage::Source::Dashboard {
                    url,
                    token: token_file.as_deref().map(first_line).transpose()?,
                },
                None => crate::usage::Source::Targets(targets),
            };
            let r = runtime()?
                .block_on(crate::usage::report(&source, window))
                .map_err(|e| e.to_string())?;
            match output {
                crate::usage::ReportFormat::Table => out!("{}", crate::usage::render_table(&r)),
                crate::usage::ReportFormat::Csv => out!("{}", crate::usage::render_csv(&r)),
                crate::usage::ReportFormat::Json => outln!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Consumer { command } => {
            let out = runtime()?
                .block_on(crate::portal_app::admin::execute(command))
                .map_err(|e| e.to_string())?;
            out!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Apikey { id } => {
            let (key, digest) = crate::apikey::generate().map_err(|e| e.to_string())?;
            outln!("key (give it to the client; it is not stored anywhere): {key}");
            outln!(
                "Consumer policy entry:
  api_keys:
    - id: {id}
      sha256: {digest}"
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
            author,
            etcd,
        } => {
            let docs = p::load_documents(&file).map_err(|e| e.to_string())?;
            runtime()?
                .block_on(p::apply_as(
                    &etcd.config(),
                    &docs,
                    dry_run,
                    &author.resolve(),
                ))
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
        PolicyCommand::Delete {
            reference,
            author,
            etcd,
        } => {
            vec![runtime()?
                .block_on(p::delete_as(&etcd.config(), &reference, &author.resolve()))
                .map_err(|e| e.to_string())?]
        }
        PolicyCommand::History {
            reference,
            output,
            etcd,
        } => {
            vec![runtime()?
                .block_on(p::history(&etcd.config(), &reference, output))
                .map_err(|e| e.to_string())?]
        }
        PolicyCommand::Rollback {
            reference,
            to_revision,
            dry_run,
            author,
            etcd,
        } => {
            let cfg = etcd.config();
            let author = author.resolve();
            let done = runtime()?.block_on(async {
                let plan = p::rollback::plan(&cfg, &reference, to_revision).await?;
                match dry_run {
                    true => Ok(plan.describe()),
                    false => p::rollback::commit(&cfg, &plan, &author).await,
                }
            });
            vec![done.map_err(|e| e.to_string())?]
        }
    };
    for l in lines {
        outln!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

fn etcd(command: EtcdCommand) -> Result<ExitCode, String> {
    use crate::etcd::rbac;
    let EtcdCommand::Rbac {
        service,
        operator,
        api_specs,
        apply,
        password_file,
        etcd,
    } = command;
    if api_specs && service.is_none() {
        return Err("--api-specs is for a service's role: give --service".into());
    }
    let plan = match (service, operator) {
        (Some(s), _) => rbac::service_plan(&etcd.etcd_prefix, &s).map(|mut p| {
            if api_specs {
                p.grants
                    .extend(rbac::api_spec_grants(&etcd.etcd_prefix, &s));
            }
            p
        }),
        (None, Some(user)) => rbac::operator_plan(&etcd.etcd_prefix, &user),
        (None, None) => return Err("give --service or --operator".into()),
    }
    .map_err(|e| e.to_string())?;
    if !apply {
        out!("{}", plan.etcdctl(password_file.as_deref()));
        return Ok(ExitCode::SUCCESS);
    }
    let password = password_file
        .as_deref()
        .map(rbac::read_password)
        .transpose()
        .map_err(|e| e.to_string())?;
    let lines = runtime()?
        .block_on(async {
            let client = crate::etcd::Etcd::connect(&etcd.config())
                .await
                .map_err(|source| rbac::RbacError::Etcd {
                    step: "connect".into(),
                    source,
                })?;
            plan.apply(&client, password.as_deref()).await
        })
        .map_err(|e| e.to_string())?;
    for l in lines {
        outln!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `wait-ready`: exit 0 when ready, 1 on timeout; with a command, exec it once ready (126 if it
/// cannot be executed, 127 if it does not exist, as a shell would).
fn wait_ready(
    admin: std::net::SocketAddr,
    timeout: Duration,
    interval: Duration,
    command: Vec<String>,
) -> Result<ExitCode, String> {
    let addr = crate::wait_ready::dial_addr(admin);
    crate::wait_ready::wait(addr, timeout, interval).map_err(|e| e.to_string())?;
    let Some((program, args)) = command.split_first() else {
        return Ok(ExitCode::SUCCESS);
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(program).args(args).exec();
    eprintln!("error: cannot execute {program}: {err}");
    Ok(ExitCode::from(
        if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
    ))
}

/// IPv4 only: the outbound listener binds one IPv4 loopback address, so IPv6 redirected to
/// `[::1]` would find no listener; the app's IPv6 traffic is left alone instead.
fn iptables(command: IptablesCommand) -> Result<ExitCode, String> {
    use crate::iptables::{self as ipt, Family};
    match command {
        IptablesCommand::Install {
            rules: args,
            dry_run,
        } => {
            let rules = args.rules();
            let input = ipt::install(&rules, Family::V4, dry_run).map_err(|e| e.to_string())?;
            if dry_run {
                out!("{input}");
            } else {
                let inbound = match rules.inbound {
                    true => rules.inbound_port.to_string(),
                    false => "off".into(),
                };
                outln!(
                    "installed transparent interception: outbound -> {}, inbound -> {inbound}, uid {} exempt",
                    rules.outbound_port, rules.proxy_uid
                );
            }
        }
        IptablesCommand::Remove { dry_run } => {
            for line in ipt::remove(Family::V4, dry_run).map_err(|e| e.to_string())? {
                outln!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Serve until SIGTERM (the kubelet stopping the pod) or SIGINT.
async fn injector(cfg: crate::inject::webhook::InjectorConfig) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let running = crate::inject::webhook::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(addr = %running.addr, "injector serving");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    running.task.abort();
    Ok(())
}

/// The first line of `path`, which must not be empty (a token or a password file).
fn first_line(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match text.lines().next().map(str::trim) {
        Some(line) if !line.is_empty() => Ok(line.to_string()),
        _ => Err(format!("{}: the first line is empty", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn dashboard_alert_flags_parse_into_its_notify_settings() {
        let cli = Cli::try_parse_from([
            "mesh-agent",
            "dashboard",
            "--identity-dir",
            "/etc/trellis",
            "--alertmanager",
            "https://am.internal:9093",
            "--webhook",
            "https://hooks.internal/t",
            "--alert-ca-file",
            "/etc/trellis/alerts-ca.pem",
            "--alert-client-cert",
            "/etc/trellis/c.pem",
            "--alert-client-key",
            "/etc/trellis/c-key.pem",
        ])
        .expect("parses");
        let Command::Dashboard { alerts, .. } = cli.command else {
            panic!("not the dashboard: {:?}", cli.command);
        };
        let n = alerts.notify();
        assert_eq!(n.alertmanagers, ["https://am.internal:9093"]);
        assert_eq!(n.webhook.as_deref(), Some("https://hooks.internal/t"));
        assert_eq!(
            n.ca_file.as_deref(),
            Some(Path::new("/etc/trellis/alerts-ca.pem"))
        );
        assert_eq!(
            n.client_cert.as_deref(),
            Some(Path::new("/etc/trellis/c.pem"))
        );
        assert_eq!(
            n.client_key.as_deref(),
            Some(Path::new("/etc/trellis/c-key.pem"))
        );
    }
}
