//! `mesh-agent iptables install|remove`: transparent interception, the job Istio's
//! `istio-iptables` and Linkerd's `proxy-init` do in an init container. The app's outbound TCP is
//! redirected to the outbound listener (15001) and inbound TCP to the inbound listener (15006),
//! so the app needs no proxy settings; the listeners read `SO_ORIGINAL_DST` to learn where a
//! redirected connection was going.
//!
//! Rules live in our own `nat` chains (`TRELLIS_*`), reached by one jump each from `PREROUTING`
//! and `OUTPUT`, so that removal deletes exactly what was installed and nothing else. Install is
//! idempotent: the chains are (re)filled in one `iptables-restore --noflush` transaction (a chain
//! declared in restore input is flushed first) and the jumps are added only when missing.
//!
//! Never redirected: traffic from the sidecar's own UID (else its upstream connections would loop
//! back into itself), traffic to loopback (the app calling the sidecar explicitly, or local
//! daemons), the admin port (probes must reach it), and the ports and networks excluded by flag.

use std::io::Write;
use std::process::{Command, Stdio};

/// Chain holding the inbound exclusions, jumped to from `PREROUTING`.
pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
/// Chain with the inbound `REDIRECT`.
pub const IN_REDIRECT_CHAIN: &str = "TRELLIS_IN_REDIRECT";
/// Chain holding the outbound exclusions, jumped to from `OUTPUT`.
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
/// Chain with the outbound `REDIRECT`.
pub const REDIRECT_CHAIN: &str = "TRELLIS_REDIRECT";

/// The UID the container image runs the sidecar as (Istio uses the same number).
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// What to redirect and what to leave alone.
#[derive(Clone, Debug)]
pub struct Rules {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// Redirect inbound traffic at all (off: outbound capture only).
    pub inbound: bool,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// CIDRs whose traffic leaves untouched, e.g. the node network or a database subnet.
    pub exclude_outbound_cidrs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {program}: {source} (install the `iptables` package)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("invalid CIDR {0:?}: expected ip/prefix")]
    Cidr(String),
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: None,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15000,
            inbound: true,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

// === impl Family ===

impl Family {
    fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

// === impl Rules ===

impl Rules {
    /// Check what would be handed to iptables before touching anything.
    pub fn validate(&self, family: Family) -> Result<(), IptablesError> {
        for c in &self.exclude_outbound_cidrs {
            let ok = c.split_once('/').is_some_and(|(ip, len)| {
                let max = match ip.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(_)) if family == Family::V4 => 32,
                    Ok(std::net::IpAddr::V6(_)) if family == Family::V6 => 128,
                    Ok(_) => return true, // the other family's CIDR: skipped when rendering
                    Err(_) => return false,
                };
                len.parse::<u8>().is_ok_and(|l| l <= max)
            });
            if !ok {
                return Err(IptablesError::Cidr(c.clone()));
            }
        }
        Ok(())
    }

    /// `iptables-restore --noflush` input that (re)creates our chains; `jumps` adds the jumps
    /// from the built-in chains (left out when they already exist).
    pub fn restore_input(&self, family: Family, jumps: Jumps) -> String {
        let mut r = String::from("*nat\n");
        for chain in [
            INBOUND_CHAIN,
            IN_REDIRECT_CHAIN,
            OUTPUT_CHAIN,
            REDIRECT_CHAIN,
        ] {
            r.push_str(&format!(":{chain} - [0:0]\n"));
        }
        // Inbound: the admin port and excluded ports keep their destination.
        if self.inbound {
            let keep = std::iter::once(self.admin_port).chain(self.exclude_inbound_ports.clone());
            for port in keep {
                r.push_str(&format!(
                    "-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN\n"
                ));
            }
            r.push_str(&format!(
                "-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}\n"
            ));
            r.push_str(&format!(
                "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}\n",
                self.inbound_port
            ));
        }
        // Outbound: the sidecar's own connections first, or they would come back to it.
        r.push_str(&format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN\n",
            self.proxy_uid
        ));
        if let Some(gid) = self.proxy_gid {
            r.push_str(&format!(
                "-A {OUTPUT_CHAIN} -m owner --gid-owner {gid} -j RETURN\n"
            ));
        }
        r.push_str(&format!(
            "-A {OUTPUT_CHAIN} -d {} -j RETURN\n",
            family.loopback()
        ));
        for port in &self.exclude_outbound_ports {
            r.push_str(&format!(
                "-A {OUTPUT_CHAIN} -p tcp --dport {port} -j RETURN\n"
            ));
        }
        for cidr in self.cidrs(family) {
            r.push_str(&format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN\n"));
        }
        r.push_str(&format!("-A {OUTPUT_CHAIN} -p tcp -j {REDIRECT_CHAIN}\n"));
        r.push_str(&format!(
            "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_port
        ));
        if jumps.prerouting && self.inbound {
            r.push_str(&format!("-A {}\n", PREROUTING_JUMP));
        }
        if jumps.output {
            r.push_str(&format!("-A {}\n", OUTPUT_JUMP));
        }
        r.push_str("COMMIT\n");
        r
    }

    fn cidrs(&self, family: Family) -> impl Iterator<Item = &String> {
        self.exclude_outbound_cidrs
            .iter()
            .filter(move |c| c.contains(':') == (family == Family::V6))
    }
}

/// The jump rules, in `iptables -S` syntax after the `-A`.
const PREROUTING_JUMP: &str = "PREROUTING -p tcp -j TRELLIS_INBOUND";
const OUTPUT_JUMP: &str = "OUTPUT -p tcp -j TRELLIS_OUTPUT";

/// Which jumps to add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jumps {
    pub prerouting: bool,
    pub output: bool,
}

/// What of ours is in a `iptables -t nat -S` listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub chains: Vec<String>,
    /// Jump rules to delete, as `-D` arguments (one entry per copy).
    pub jumps: Vec<String>,
}

/// Parse `iptables -t nat -S` output.
pub fn installed(listing: &str) -> Installed {
    let mut found = Installed::default();
    for line in listing.lines().map(str::trim) {
        if let Some(chain) = line.strip_prefix("-N ") {
            if chain.starts_with("TRELLIS_") {
                found.chains.push(chain.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let builtin = rule.starts_with("PREROUTING ") || rule.starts_with("OUTPUT ");
            if builtin && (rule.ends_with(INBOUND_CHAIN) || rule.ends_with(OUTPUT_CHAIN)) {
                found.jumps.push(rule.to_string());
            }
        }
    }
    found
}

/// The commands that remove everything [`installed`] found: jumps first (a referenced chain
/// cannot be deleted), then flush and delete each chain.
pub fn removal_commands(found: &Installed) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    for jump in &found.jumps {
        let mut c = vec!["-t".into(), "nat".into(), "-D".into()];
        c.extend(jump.split_whitespace().map(str::to_string));
        cmds.push(c);
    }
    for flag in ["-F", "-X"] {
        for chain in &found.chains {
            cmds.push(vec!["-t".into(), "nat".into(), flag.into(), chain.clone()]);
        }
    }
    cmds
}

/// Install the rules for one family: idempotent, the chains replaced atomically.
pub fn install(rules: &Rules, family: Family, dry_run: bool) -> Result<String, IptablesError> {
    rules.validate(family)?;
    let listing = if dry_run {
        String::new()
    } else {
        run(family.prefix(), &["-t", "nat", "-S"], None)?
    };
    let found = installed(&listing);
    let has = |j: &str| found.jumps.iter().any(|f| f == j);
    let input = rules.restore_input(
        family,
        Jumps {
            prerouting: !has(PREROUTING_JUMP),
            output: !has(OUTPUT_JUMP),
        },
    );
    if !dry_run {
        let restore = format!("{}-restore", family.prefix());
        run(&restore, &["--noflush"], Some(&input))?;
    }
    Ok(input)
}

/// Remove whatever of ours is installed for one family; nothing installed is not an error.
/// Returns the commands run (or, with `dry_run`, that would run).
pub fn remove(family: Family, dry_run: bool) -> Result<Vec<String>, IptablesError> {
    let listing = run(family.prefix(), &["-t", "nat", "-S"], None)?;
    let cmds = removal_commands(&installed(&listing));
    let mut done = Vec::with_capacity(cmds.len());
    for c in cmds {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        if !dry_run {
            run(family.prefix(), &args, None)?;
        }
        done.push(format!("{} {}", family.prefix(), c.join(" ")));
    }
    Ok(done)
}

/// Run a program, feeding `stdin`; its stdout, or its stderr as the error.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IptablesError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the program's own failure below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| IptablesError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(IptablesError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Jumps = Jumps {
        prerouting: true,
        output: true,
    };

    #[test]
    fn renders_exclusions_before_the_redirects() {
        let rules = Rules {
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["10.96.0.0/12".into(), "fd00::/8".into()],
            ..Rules::default()
        };
        let v4 = rules.restore_input(Family::V4, ALL);
        let expected = "*nat
:TRELLIS_INBOUND - [0:0]
:TRELLIS_IN_REDIRECT - [0:0]
:TRELLIS_OUTPUT - [0:0]
:TRELLIS_REDIRECT - [0:0]
-A TRELLIS_INBOUND -p tcp --dport 15000 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN
-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT
-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN
-A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN
-A TRELLIS_OUTPUT -d 10.96.0.0/12 -j RETURN
-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT
-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
COMMIT
";
        assert_eq!(v4, expected);
        let v6 = rules.restore_input(Family::V6, ALL);
        assert!(
            v6.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN"),
            "{v6}"
        );
        assert!(v6.contains("-d fd00::/8 -j RETURN"), "{v6}");
        assert!(!v6.contains("10.96.0.0/12"), "{v6}");
    }

    #[test]
    fn existing_jumps_are_not_added_twice_and_outbound_only_has_no_prerouting() {
        let rules = Rules {
            inbound: false,
            ..Rules::default()
        };
        let r = rules.restore_input(
            Family::V4,
            Jumps {
                prerouting: true,
                output: false,
            },
        );
        assert!(!r.contains("PREROUTING"), "{r}");
        assert!(!r.contains("-A OUTPUT"), "{r}");
        assert!(!r.contains("REDIRECT --to-ports 15006"), "{r}");
    }

    #[test]
    fn finds_and_removes_only_our_rules() {
        let listing = "-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-N DOCKER
-N TRELLIS_INBOUND
-N TRELLIS_OUTPUT
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT
";
        let found = installed(listing);
        assert_eq!(found.chains, ["TRELLIS_INBOUND", "TRELLIS_OUTPUT"]);
        assert_eq!(found.jumps.len(), 3, "{found:?}");
        let cmds: Vec<String> = removal_commands(&found)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(
            cmds,
            [
                "-t nat -D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-t nat -D OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "-t nat -D OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "-t nat -F TRELLIS_INBOUND",
                "-t nat -F TRELLIS_OUTPUT",
                "-t nat -X TRELLIS_INBOUND",
                "-t nat -X TRELLIS_OUTPUT",
            ]
        );
        assert_eq!(installed("-N DOCKER\n"), Installed::default());
    }

    #[test]
    fn rejects_malformed_cidrs() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "nonsense/8"] {
            let rules = Rules {
                exclude_outbound_cidrs: vec![bad.into()],
                ..Rules::default()
            };
            assert!(rules.validate(Family::V4).is_err(), "{bad}");
        }
    }
}
