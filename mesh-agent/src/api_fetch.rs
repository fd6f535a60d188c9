//! The app's own OpenAPI document (`api_spec:` in the sidecar file, docs/api-specs.md): the
//! sidecar fetches `GET http://<inbound.app><path>`, validates it as `api put` does, and stores
//! it in etcd when its content changed. Stored once per content hash, so every instance of a
//! service writing the same document adds only its (identical) index entry.
//!
//! A background task started after the listeners are bound: it never delays the sidecar's
//! start or its requests. Until the app first answers it is tried every second (the app
//! turning healthy), then every `interval`. An invalid document is logged once per distinct
//! body with the validation error, counted, and not stored: the last good one stays listed.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use trellis_policies::{ApiSpecSpec, MAX_SPEC_BYTES};

use crate::api::{self, Spec};
use crate::config::{ApiSpecFetchConfig, EtcdConfig, API_SPEC_STARTUP_RETRY};

/// Failures of the app's document, by kind: `fetch` (no 2xx answer, too large, timeout),
/// `invalid` (refused by validation), `store` (etcd refused or unreachable).
#[derive(Clone, Default)]
pub struct FetchMetrics {
    failures: Family<KindLabels, Counter>,
    stored: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

impl FetchMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "api_spec_fetch_failures",
            "Fetches of the app's OpenAPI document that were not stored, by kind (fetch, invalid, store); the last good document stays",
            m.failures.clone(),
        );
        registry.register(
            "api_spec_stored",
            "New versions of the app's OpenAPI document written to etcd",
            m.stored.clone(),
        );
        m
    }

    fn fail(&self, kind: &'static str) {
        self.failures.get_or_create(&KindLabels { kind }).inc();
    }
}

/// Why one fetch gave no document to validate.
#[derive(Debug, PartialEq, Eq)]
enum FetchError {
    /// Not answering yet (connection refused, timeout): the app is starting or down.
    Unreachable(String),
    /// Answered, but not with a usable document (status, size, encoding).
    Refused(String),
}

/// The fetching task of one sidecar.
pub struct SpecFetcher {
    cfg: ApiSpecFetchConfig,
    etcd: EtcdConfig,
    service: String,
    uri: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    metrics: FetchMetrics,
    /// SHA-256 of the last body handled (stored, or refused and logged): an unchanged body is
    /// neither validated again nor logged again.
    last_body: Option<String>,
    /// The last fetch error logged, so a down app is logged once, not every second.
    last_error: Option<String>,
}

impl SpecFetcher {
    pub fn new(
        cfg: ApiSpecFetchConfig,
        etcd: EtcdConfig,
        service: &str,
        app: SocketAddr,
        metrics: FetchMetrics,
    ) -> Self {
        let uri = format!("http://{app}{}", cfg.path);
        Self {
            cfg,
            etcd,
            service: service.to_string(),
            uri,
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
            metrics,
            last_body: None,
            last_error: None,
        }
    }

    /// Fetch forever: every second until the app first answers, then every `interval`.
    pub async fn run(mut self) {
        let mut answered = false;
        loop {
            answered |= self.once().await;
            let wait = match answered {
                true => self.cfg.interval,
                false => API_SPEC_STARTUP_RETRY.min(self.cfg.interval),
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One round; `true` if the app answered with a body.
    async fn once(&mut self) -> bool {
        let body = match self.fetch().await {
            Ok(b) => b,
            Err(FetchError::Unreachable(e)) => {
                self.log_error(e, false);
                return false;
            }
            Err(FetchError::Refused(e)) => {
                self.metrics.fail("fetch");
                self.log_error(e, true);
                return true;
            }
        };
        self.last_error = None;
        let hash = sha256_hex(&body);
        if self.last_body.as_deref() == Some(hash.as_str()) {
            return true;
        }
        let spec = match self.validate(body) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.fail("invalid");
                tracing::warn!(
                    uri = %self.uri,
                    error = %e,
                    "the app's OpenAPI document is invalid; not stored, the last good one stays"
                );
                self.last_body = Some(hash);
                return true;
            }
        };
        match api::put(&self.etcd, std::slice::from_ref(&spec), false).await {
            Ok(lines) => {
                self.metrics.stored.inc();
                for line in lines {
                    tracing::info!(uri = %self.uri, "the app's OpenAPI document: {line}");
                }
                self.last_body = Some(hash);
            }
            // Retried next round (the body hash is not recorded).
            Err(e) => {
                self.metrics.fail("store");
                tracing::warn!(uri = %self.uri, error = %e, "cannot store the app's OpenAPI document; retrying");
            }
        }
        true
    }

    /// Log a fetch error once until it changes or a fetch succeeds.
    fn log_error(&mut self, e: String, warn: bool) {
        if self.last_error.as_deref() == Some(e.as_str()) {
            return;
        }
        match warn {
            true => {
                tracing::warn!(uri = %self.uri, error = %e, "cannot fetch the app's OpenAPI document")
            }
            false => {
                tracing::info!(uri = %self.uri, error = %e, "the app does not answer for its OpenAPI document yet; retrying")
            }
        }
        self.last_error = Some(e);
    }

    /// `GET` the document, bounded in time and size.
    async fn fetch(&self) -> Result<Bytes, FetchError> {
        let req = http::Request::get(self.uri.as_str())
            .header(http::header::ACCEPT, "application/json, application/yaml")
            .body(Empty::new())
            .map_err(|e| FetchError::Refused(format!("bad request: {e}")))?;
        let get = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| FetchError::Unreachable(format!("{e}")))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(FetchError::Refused(format!("answered {status}")));
            }
            let too_large = || {
                FetchError::Refused(format!(
                    "the document is over the limit of {MAX_SPEC_BYTES} bytes (8 MiB)"
                ))
            };
            let declared = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_SPEC_BYTES as u64) {
                return Err(too_large());
            }
            match Limited::new(resp.into_body(), MAX_SPEC_BYTES)
                .collect()
                .await
            {
                Ok(c) => Ok(c.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
                Err(e) => Err(FetchError::Refused(format!("cannot read the body: {e}"))),
            }
        };
        match tokio::time::timeout(self.cfg.timeout, get).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Unreachable(format!(
                "no answer within {}",
                humantime::format_duration(self.cfg.timeout)
            ))),
        }
    }

    /// Validate as `api put` does; the version is the configured one or `info.version`.
    fn validate(&self, body: Bytes) -> Result<Spec, String> {
        let text = String::from_utf8(body.to_vec()).map_err(|e| format!("not UTF-8: {e}"))?;
        let version = match &self.cfg.version {
            Some(v) => v.clone(),
            None => {
                let doc = trellis_policies::parse_openapi(&text).map_err(|e| e.to_string())?;
                let v = doc
                    .pointer("/info/version")
                    .and_then(Value::as_str)
                    .ok_or("$.info.version: missing; it names the version unless api_spec.version is set")?
                    .to_string();
                trellis_policies::validate_api_version(&v).map_err(|m| {
                    format!("$.info.version: {m}; set api_spec.version to list it under another")
                })?;
                v
            }
        };
        let spec = ApiSpecSpec {
            service: self.service.clone(),
            version,
            document: Value::String(text),
        };
        let (document, summary) = spec.validate()?;
        Ok(Spec {
            service: spec.service,
            version: spec.version,
            document,
            summary,
        })
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher(version: Option<&str>) -> SpecFetcher {
        let mut cfg = ApiSpecFetchConfig::new("/openapi.json");
        cfg.version = version.map(str::to_string);
        SpecFetcher::new(
            cfg,
            EtcdConfig::new(vec!["http://127.0.0.1:1".into()]),
            "orders",
            "127.0.0.1:1".parse().unwrap(),
            FetchMetrics::default(),
        )
    }

    const DOC: &str =
        r#"{"openapi":"3.1.0","info":{"title":"Orders","version":"1.2.0"},"paths":{}}"#;

    #[test]
    fn the_version_is_info_version_unless_configured() {
        let s = fetcher(None)
            .validate(Bytes::from_static(DOC.as_bytes()))
            .unwrap();
        assert_eq!(
            (s.service.as_str(), s.version.as_str()),
            ("orders", "1.2.0")
        );
        let s = fetcher(Some("v1"))
            .validate(Bytes::from_static(DOC.as_bytes()))
            .unwrap();
        assert_eq!(s.version, "v1");
        let bad = DOC.replace("1.2.0", "1.2 beta");
        let err = fetcher(None)
            .validate(Bytes::from(bad.clone()))
            .unwrap_err();
        assert!(
            err.contains("$.info.version") && err.contains("api_spec.version"),
            "{err}"
        );
        fetcher(Some("v1")).validate(Bytes::from(bad)).unwrap();
        let err = fetcher(None)
            .validate(Bytes::from_static(b"{\"openapi\": 3"))
            .unwrap_err();
        assert!(err.contains("JSON"), "{err}");
        let err = fetcher(None)
            .validate(Bytes::from_static(b"\xff\xfe"))
            .unwrap_err();
        assert!(err.contains("UTF-8"), "{err}");
    }
}
