//! Least privilege in etcd: `mesh-agent etcd rbac`.
//!
//! With etcd's authentication on, every sidecar of service `S` can log in as user `S` (a
//! password, or a client certificate whose common name is `S`), whose only role
//! `trellis-service-S` lets it write what a sidecar of `S` writes and read what it reads:
//!
//! | access | prefix | why |
//! | --- | --- | --- |
//! | read | `<prefix>/v1/mesh/` | the one watch: every registration and policy it routes with |
//! | readwrite | `<prefix>/v1/mesh/services/S/instances/` | its instance's registration |
//! | readwrite | `<prefix>/v1/status/S/` | its applied revision (`mesh-agent status`) |
//! | readwrite | `<prefix>/v1/ratelimit/S/` | its demand for S's global rate limits, and the table of its peers' |
//!
//! With `--api-specs` ([`api_spec_grants`]), also readwrite on `<prefix>/v1/apis/specs/` and
//! `<prefix>/v1/apis/index/S/`: the app's OpenAPI documents (`api_spec:`).
//!
//! So a compromised sidecar of `S` cannot register instances of another service, change a
//! policy, or fake another service's status or rate-limit demand. (It can still overwrite a
//! registration of another instance of `S`: the service is the unit of trust, as its
//! certificate is.) Leases need no permission to grant or keep alive; revoking one needs write
//! access to every key attached, which for a sidecar's lease are exactly the three keys above.
//!
//! Operators (`mesh-agent policy`, `status`) get `trellis-operator`: readwrite on `<prefix>/`,
//! which covers policies, their history, and clearing stale registrations.
//!
//! The plan is printed as `etcdctl` commands by default, or applied through etcd's auth API
//! with `--apply`; applying is idempotent and exact (permissions the role should not have, e.g.
//! after a layout change, are revoked).

use std::path::Path;

use etcd_client::{Permission, PermissionType, RoleRevokePermissionOptions, UserAddOptions};

use super::keys::Keys;
use super::{Etcd, EtcdError};

/// The operators' role.
pub const OPERATOR_ROLE: &str = "trellis-operator";

/// The role of one service's sidecars.
pub fn service_role(service: &str) -> String {
    format!("trellis-service-{service}")
}

#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("invalid service name `{name}`: {reason}")]
    Service { name: String, reason: String },
    #[error("invalid etcd user name `{0}`: it must be non-empty and without spaces or `:`")]
    User(String),
    #[error("cannot read the password file {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the password file {0} is empty")]
    EmptyPassword(String),
    #[error("{step}: {source}")]
    Etcd {
        step: String,
        #[source]
        source: EtcdError,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

// === impl Access ===

impl Access {
    fn etcdctl(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::ReadWrite => "readwrite",
        }
    }

    fn perm_type(self) -> PermissionType {
        match self {
            Access::Read => PermissionType::Read,
            Access::ReadWrite => PermissionType::Readwrite,
        }
    }
}

/// One prefix permission of a role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub access: Access,
    pub prefix: String,
    pub why: &'static str,
}

/// A role, its prefix permissions, and the user that gets it.
#[derive(Clone, Debug)]
pub struct Plan {
    pub role: String,
    pub user: String,
    pub grants: Vec<Grant>,
}

/// What a sidecar of `service` needs (see the module documentation).
pub fn service_plan(prefix: &str, service: &str) -> Result<Plan, RbacError> {
    trellis_policies::validate_service_name(service).map_err(|reason| RbacError::Service {
        name: service.to_string(),
        reason,
    })?;
    let k = Keys::new(prefix);
    Ok(Plan {
        role: service_role(service),
        user: service.to_string(),
        grants: vec![
            Grant {
                access: Access::Read,
                prefix: k.mesh(),
                why: "the watch: every registration and policy",
            },
            Grant {
                access: Access::ReadWrite,
                prefix: k.instances(service),
                why: "its instances' registrations",
            },
            Grant {
                access: Access::ReadWrite,
                prefix: k.service_statuses(service),
                why: "its instances' applied revisions",
            },
            Grant {
                access: Access::ReadWrite,
                prefix: k.demands(service),
                why: "rate-limit demand: its own, and its peers' for the shares",
            },
        ],
    })
}

/// `etcd rbac --service S --api-specs`: what a sidecar of `service` with `api_spec:` also
/// writes (docs/api-specs.md). The documents are shared by content hash, so that prefix is
/// common to every service: a compromised sidecar could overwrite or delete another service's
/// document there, which readers detect (the hash is checked) but cannot repair. Hence opt-in.
pub fn api_spec_grants(prefix: &str, service: &str) -> Vec<Grant> {
    let k = Keys::new(prefix);
    vec![
        Grant {
            access: Access::ReadWrite,
            prefix: k.api_spec(""),
            why: "the app's OpenAPI documents, stored once per content hash (shared)",
        },
        Grant {
            access: Access::ReadWrite,
            prefix: k.api_service(service),
            why: "the index entries of its API versions",
        },
    ]
}

/// The operators' role, given to `user`.
pub fn operator_plan(prefix: &str, user: &str) -> Result<Plan, RbacError> {
    if user.is_empty() || user.contains(char::is_whitespace) || user.contains(':') {
        return Err(RbacError::User(user.to_string()));
    }
    let k = Keys::new(prefix);
    Ok(Plan {
        role: OPERATOR_ROLE.to_string(),
        user: user.to_string(),
        grants: vec![Grant {
            access: Access::ReadWrite,
            prefix: k.all().to_string(),
            why: "policies, their history, and every registration and status",
        }],
    })
}

/// Read a password file: the first line, without its line ending.
pub fn read_password(path: &Path) -> Result<String, RbacError> {
    let text = std::fs::read_to_string(path).map_err(|source| RbacError::PasswordFile {
        path: path.display().to_string(),
        source,
    })?;
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        return Err(RbacError::EmptyPassword(path.display().to_string()));
    }
    Ok(password)
}

/// Quote for a POSIX shell.
fn sh(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/-_.=:@%+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// === impl Plan ===

impl Plan {
    /// The plan as `etcdctl` (API v3) commands, run as etcd's root user. The password is never
    /// printed: it is read from `password_file` when the commands run; without one the user
    /// has no password and logs in with a client certificate whose common name is the user.
    pub fn etcdctl(&self, password_file: Option<&Path>) -> String {
        let mut out = format!(
            "# role {} for user {} (run as etcd's root user; ETCDCTL_API=3)\n",
            self.role, self.user
        );
        out.push_str(&format!("etcdctl role add {}\n", sh(&self.role)));
        for g in &self.grants {
            out.push_str(&format!(
                "etcdctl role grant-permission {} --prefix=true {} {}    # {}\n",
                sh(&self.role),
                g.access.etcdctl(),
                sh(&g.prefix),
                g.why
            ));
        }
        match password_file {
            Some(f) => out.push_str(&format!(
                "etcdctl user add {} --interactive=false --new-user-password=\"$(head -n1 {})\"\n",
                sh(&self.user),
                sh(&f.display().to_string())
            )),
            None => out.push_str(&format!(
                "etcdctl user add {} --no-password    # logs in with a client certificate whose CN is {}\n",
                sh(&self.user),
                self.user
            )),
        }
        out.push_str(&format!(
            "etcdctl user grant-role {} {}\n",
            sh(&self.user),
            sh(&self.role)
        ));
        out
    }

    /// Create or update the role and the user through etcd's auth API (as root, or before
    /// auth is enabled). Idempotent: an existing role is brought to exactly the plan's
    /// permissions; an existing user gets the new password if one is given and keeps its
    /// password otherwise. Returns one line per change made.
    pub async fn apply(
        &self,
        etcd: &Etcd,
        password: Option<&str>,
    ) -> Result<Vec<String>, RbacError> {
        let mut c = etcd.client.clone();
        let mut done = Vec::new();
        let step = |what: String| move |source| RbacError::Etcd { step: what, source };

        match etcd.call(c.role_add(self.role.as_str())).await {
            Ok(_) => done.push(format!("created role {}", self.role)),
            Err(e) if already_exists(&e) => {}
            Err(e) => return Err(step(format!("add role {}", self.role))(e)),
        }
        let existing = etcd
            .call(c.role_get(self.role.as_str()))
            .await
            .map_err(step(format!("read role {}", self.role)))?
            .permissions();
        let wanted: Vec<(Vec<u8>, Vec<u8>, i32)> = self
            .grants
            .iter()
            .map(|g| {
                (
                    g.prefix.as_bytes().to_vec(),
                    prefix_end(g.prefix.as_bytes()),
                    g.access.perm_type() as i32,
                )
            })
            .collect();
        for p in &existing {
            let have = (p.key().to_vec(), p.range_end().to_vec(), p.get_type());
            if wanted.contains(&have) {
                continue;
            }
            let key = String::from_utf8_lossy(p.key()).into_owned();
            let mut opts = RoleRevokePermissionOptions::new();
            if !p.range_end().is_empty() {
                opts = opts.with_range_end(p.range_end().to_vec());
            }
            etcd.call(c.role_revoke_permission(self.role.as_str(), p.key().to_vec(), Some(opts)))
                .await
                .map_err(step(format!("revoke {key} from role {}", self.role)))?;
            done.push(format!(
                "revoked {key} from role {} (not in the plan)",
                self.role
            ));
        }
        for (g, w) in self.grants.iter().zip(&wanted) {
            let present = existing
                .iter()
                .any(|p| (p.key().to_vec(), p.range_end().to_vec(), p.get_type()) == *w);
            if present {
                continue;
            }
            let perm = Permission::new(g.access.perm_type(), g.prefix.as_str()).with_prefix();
            etcd.call(c.role_grant_permission(self.role.as_str(), perm))
                .await
                .map_err(step(format!("grant {} to role {}", g.prefix, self.role)))?;
            done.push(format!(
                "granted {} on {}* to role {}",
                g.access.etcdctl(),
                g.prefix,
                self.role
            ));
        }

        let options = match password {
            Some(_) => None,
            None => Some(UserAddOptions::new().with_no_pwd()),
        };
        match etcd
            .call(c.user_add(self.user.as_str(), password.unwrap_or(""), options))
            .await
        {
            Ok(_) => done.push(match password {
                Some(_) => format!("created user {} with a password", self.user),
                None => format!(
                    "created user {} without a password (client certificate with CN {} only)",
                    self.user, self.user
                ),
            }),
            Err(e) if already_exists(&e) => {
                if let Some(pw) = password {
                    etcd.call(c.user_change_password(self.user.as_str(), pw))
                        .await
                        .map_err(step(format!("set the password of user {}", self.user)))?;
                    done.push(format!("changed the password of user {}", self.user));
                }
            }
            Err(e) => return Err(step(format!("add user {}", self.user))(e)),
        }
        let roles = etcd
            .call(c.user_get(self.user.as_str()))
            .await
            .map_err(step(format!("read user {}", self.user)))?;
        if !roles.roles().contains(&self.role) {
            etcd.call(c.user_grant_role(self.user.as_str(), self.role.as_str()))
                .await
                .map_err(step(format!(
                    "grant role {} to user {}",
                    self.role, self.user
                )))?;
            done.push(format!("granted role {} to user {}", self.role, self.user));
        }
        if done.is_empty() {
            done.push(format!(
                "role {} and user {} already as planned",
                self.role, self.user
            ));
        }
        Ok(done)
    }
}

/// etcd's range end for "every key starting with `prefix`": the prefix with its last byte
/// below 0xff incremented (what `--prefix` and `with_prefix` send).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn already_exists(e: &EtcdError) -> bool {
    matches!(e, EtcdError::Call { source: etcd_client::Error::GRpcStatus(s), .. } if s.message().contains("already exists"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_plan_writes_only_its_own_prefixes() {
        let p = service_plan("/trellis", "orders").expect("plan");
        assert_eq!(p.role, "trellis-service-orders");
        assert_eq!(p.user, "orders");
        let writes: Vec<&str> = p
            .grants
            .iter()
            .filter(|g| g.access == Access::ReadWrite)
            .map(|g| g.prefix.as_str())
            .collect();
        assert_eq!(
            writes,
            [
                "/trellis/v1/mesh/services/orders/instances/",
                "/trellis/v1/status/orders/",
                "/trellis/v1/ratelimit/orders/"
            ]
        );
        let reads: Vec<&str> = p
            .grants
            .iter()
            .filter(|g| g.access == Access::Read)
            .map(|g| g.prefix.as_str())
            .collect();
        assert_eq!(reads, ["/trellis/v1/mesh/"]);
        assert!(service_plan("/trellis", "Bad Name").is_err());
        let api: Vec<String> = api_spec_grants("/trellis", "orders")
            .into_iter()
            .map(|g| g.prefix)
            .collect();
        assert_eq!(
            api,
            ["/trellis/v1/apis/specs/", "/trellis/v1/apis/index/orders/"]
        );
    }

    #[test]
    fn etcdctl_commands_name_the_password_file_never_the_password() {
        let p = service_plan("/trellis/", "orders").expect("plan");
        let text = p.etcdctl(Some(Path::new("/run/secrets/orders pw")));
        assert!(
            text.contains("etcdctl role add trellis-service-orders\n"),
            "{text}"
        );
        assert!(
            text.contains("etcdctl role grant-permission trellis-service-orders --prefix=true readwrite /trellis/v1/status/orders/"),
            "{text}"
        );
        assert!(text.contains("'/run/secrets/orders pw'"), "{text}");
        assert!(text.contains("etcdctl user grant-role orders trellis-service-orders"));
        let text = operator_plan("/trellis", "alice")
            .expect("plan")
            .etcdctl(None);
        assert!(
            text.contains("--prefix=true readwrite /trellis/ "),
            "{text}"
        );
        assert!(text.contains("user add alice --no-password"), "{text}");
        assert!(operator_plan("/trellis", "a b").is_err());
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn the_password_is_the_first_line() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").expect("write");
        assert_eq!(read_password(&f).expect("read"), "s3cret");
        std::fs::write(&f, "\n").expect("write");
        assert!(matches!(
            read_password(&f),
            Err(RbacError::EmptyPassword(_))
        ));
        assert!(matches!(
            read_password(&dir.path().join("absent")),
            Err(RbacError::PasswordFile { .. })
        ));
    }
}
