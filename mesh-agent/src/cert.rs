//! `mesh-agent cert`: create a CA for a trust domain and issue short-lived service leaves.

use std::path::Path;
use std::time::Duration;

use trellis_proxy::identity::{CaError, CertificateAuthority};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} already exists; pass --force to replace the CA (every issued certificate becomes untrusted)")]
    Exists(String),
    #[error("cannot create {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
}

/// Create `ca.pem` and `ca-key.pem` in `dir`.
pub fn init(
    trust_domain: &str,
    dir: &Path,
    validity: Duration,
    force: bool,
) -> Result<CertificateAuthority, CertError> {
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() && !force {
        return Err(CertError::Exists(ca_path.display().to_string()));
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let ca = CertificateAuthority::generate(trust_domain, validity)?;
    ca.write(dir)?;
    Ok(ca)
}

/// Load the CA from `ca_dir`.
pub fn load_ca(ca_dir: &Path) -> Result<CertificateAuthority, CertError> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(CertificateAuthority::from_pem(
        &read("ca.pem")?,
        &read("ca-key.pem")?,
    )?)
}

/// Issue `<service>.pem` / `<service>-key.pem` into `out_dir`, valid for `ttl`.
pub fn issue(
    ca_dir: &Path,
    service: &str,
    ttl: Duration,
    out_dir: &Path,
) -> Result<String, CertError> {
    trellis_policies::validate_service_name(service).map_err(CaError::BadCa)?;
    let ca = load_ca(ca_dir)?;
    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Dir {
        path: out_dir.display().to_string(),
        source,
    })?;
    ca.issue_service(service, ttl)?.write(out_dir, service)?;
    if out_dir != ca_dir {
        // The sidecar needs the bundle next to its leaf; replaced atomically like the leaf,
        // since a running sidecar re-reads it.
        trellis_proxy::atomic_file::write_atomic(
            &out_dir.join("ca.pem"),
            ca.cert_pem().as_bytes(),
            0o644,
        )
        .map_err(CaError::Write)?;
    }
    Ok(format!("spiffe://{}/service/{service}", ca.trust_domain()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_writes_loadable_identity() {
        let dir = tempfile::tempdir().unwrap();
        init("example.org", dir.path(), Duration::from_secs(3600), false).unwrap();
        assert!(matches!(
            init("example.org", dir.path(), Duration::from_secs(3600), false),
            Err(CertError::Exists(_))
        ));
        let id = issue(dir.path(), "orders", Duration::from_secs(60), dir.path()).unwrap();
        assert_eq!(id, "spiffe://example.org/service/orders");
        let files = trellis_proxy::identity::IdentityFiles {
            cert: dir.path().join("orders.pem"),
            key: dir.path().join("orders-key.pem"),
            bundle: dir.path().join("ca.pem"),
        };
        let expected = trellis_policies::SpiffeId::parse(&id).unwrap();
        trellis_proxy::identity::TlsContext::load(&files, &expected, 1).unwrap();
        assert!(issue(dir.path(), "Bad_Name", Duration::from_secs(60), dir.path()).is_err());
    }

    /// Keys are 0600 and certificates 0644, and nothing but them is left in the directory.
    #[cfg(unix)]
    #[test]
    fn keys_are_private_and_no_temporary_file_is_left() {
        use std::os::unix::fs::PermissionsExt;
        let ca_dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        init(
            "example.org",
            ca_dir.path(),
            Duration::from_secs(3600),
            false,
        )
        .unwrap();
        issue(ca_dir.path(), "orders", Duration::from_secs(60), out.path()).unwrap();
        let mode =
            |p: std::path::PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(ca_dir.path().join("ca-key.pem")), 0o600);
        assert_eq!(mode(out.path().join("orders-key.pem")), 0o600);
        assert_eq!(mode(out.path().join("orders.pem")) & 0o600, 0o600);
        let mut names: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.pem", "orders-key.pem", "orders.pem"]);
    }
}
