//! OpenAPI validation at the ingress, the agent's half: compiles the stored documents the
//! gateway's HTTPRoutes name in `rules[].validation` and publishes them to the data plane whole
//! (`trellis_proxy::validate::ValidatorSet`); and refuses, at `policy apply`, a route naming a
//! document that is not stored.
//!
//! Every [`REFRESH`] the routes and the index entries they name are read from etcd. A document
//! is fetched and compiled only when its content hash is new (compiled documents are kept by
//! hash, so two versions with the same content, or a route moved between them, compile
//! nothing), on a blocking thread. A document that cannot be read or compiled is logged (once
//! per distinct error) and counted (`trellis_api_validation_failures_total{kind}`), and the
//! last good compilation of that service version keeps serving. Requests never compile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use trellis_policies::{ApiRef, HttpRouteSpec, Policy, PolicyDocument};
use trellis_proxy::validate::{ApiValidators, CompiledSpec, ValidatorSet};

use crate::api::{document, entry, ApiError};
use crate::config::EtcdConfig;
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;

/// How often the routes and documents are read again.
pub const REFRESH: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `read` (etcd, or a document that does not read back), `missing` (a route names a
    /// document that is not stored), `compile`.
    pub kind: &'static str,
}

/// The loader's metrics.
#[derive(Clone, Default)]
pub struct LoaderMetrics {
    pub failures: Family<KindLabel, Counter>,
    /// Service versions with a compiled document published.
    pub loaded: Gauge,
}

/// Keeps the ingress's compiled documents up to date until the task is dropped.
pub struct ValidatorLoader {
    pub etcd: EtcdConfig,
    pub gateway: String,
    pub validators: ApiValidators,
    pub metrics: LoaderMetrics,
    /// Compiled documents by content hash.
    compiled: HashMap<String, Arc<CompiledSpec>>,
    /// What is published: each service version's hash and compilation.
    published: BTreeMap<ApiRef, (String, Arc<CompiledSpec>)>,
    /// Errors already logged (each once, until it is gone).
    logged: BTreeSet<String>,
}

// === impl LoaderMetrics ===

impl LoaderMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "api_validation_failures",
            "OpenAPI documents for validation that could not be read, were missing, or did not compile (the last good compilation keeps serving), by kind",
            m.failures.clone(),
        );
        registry.register(
            "api_validation_documents",
            "Service versions whose compiled OpenAPI document the ingress validates with",
            m.loaded.clone(),
        );
        m
    }

    fn failed(&self, kind: &'static str) {
        self.failures.get_or_create(&KindLabel { kind }).inc();
    }
}

// === impl ValidatorLoader ===

impl ValidatorLoader {
    pub fn new(
        etcd: EtcdConfig,
        gateway: String,
        validators: ApiValidators,
        metrics: LoaderMetrics,
    ) -> Self {
        Self {
            etcd,
            gateway,
            validators,
            metrics,
            compiled: HashMap::new(),
            published: BTreeMap::new(),
            logged: BTreeSet::new(),
        }
    }

    pub async fn run(mut self) {
        let mut conn: Option<Etcd> = None;
        loop {
            let mut errors = Vec::new();
            if let Err(e) = self.refresh(&mut conn, &mut errors).await {
                self.metrics.failed("read");
                // A broken connection is made again next time.
                conn = None;
                errors.push(format!("cannot read the routes or documents: {e}"));
            }
            self.log(errors);
            tokio::time::sleep(REFRESH).await;
        }
    }

    /// Log each error once while it lasts.
    fn log(&mut self, errors: Vec<String>) {
        let now: BTreeSet<String> = errors.into_iter().collect();
        for e in now.difference(&self.logged) {
            tracing::warn!(error = %e, "API validation: the last good documents keep serving");
        }
        self.logged = now;
    }

    async fn refresh(
        &mut self,
        conn: &mut Option<Etcd>,
        errors: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        let etcd = match conn {
            Some(e) => e,
            None => conn.insert(Etcd::connect(&self.etcd).await?),
        };
        let keys = Keys::new(&self.etcd.prefix);
        let (routes, notes) = crate::api_public::routes(etcd, &keys).await?;
        errors.extend(notes);
        let wanted = named(&self.gateway, routes.iter().map(|(_, s)| s));
        let mut next = BTreeMap::new();
        for api in wanted {
            match self.load(etcd, &keys, &api).await {
                Ok(loaded) => {
                    next.insert(api, loaded);
                }
                Err((kind, e)) => {
                    self.metrics.failed(kind);
                    errors.push(format!("{api}: {e}"));
                    // The last good compilation keeps serving.
                    if let Some(last) = self.published.get(&api) {
                        next.insert(api, last.clone());
                    }
                }
            }
        }
        self.publish(next);
        Ok(())
    }

    /// The compilation of `api`'s stored document: kept by hash, compiled when new.
    async fn load(
        &mut self,
        etcd: &Etcd,
        keys: &Keys,
        api: &ApiRef,
    ) -> Result<(String, Arc<CompiledSpec>), (&'static str, String)> {
        let e = match entry(etcd, keys, &api.service, Some(&api.version)).await {
            Ok(e) => e,
            Err(ApiError::NotFound(_)) => {
                return Err((
                    "missing",
                    "no document is stored (mesh-agent api put)".into(),
                ))
            }
            Err(e) => return Err(("read", e.to_string())),
        };
        if let Some(c) = self.compiled.get(&e.sha256) {
            return Ok((e.sha256, c.clone()));
        }
        let doc = document(etcd, keys, &e)
            .await
            .map_err(|err| ("read", err.to_string()))?;
        let compiled = tokio::task::spawn_blocking(move || CompiledSpec::compile(&doc))
            .await
            .map_err(|err| ("compile", err.to_string()))?
            .map_err(|err| ("compile", format!("document {}: {err}", e.sha256)))?;
        tracing::info!(api = %api, sha256 = %e.sha256, operations = compiled.operations, "API validation: document compiled");
        let compiled = Arc::new(compiled);
        self.compiled.insert(e.sha256.clone(), compiled.clone());
        Ok((e.sha256, compiled))
    }

    /// Publish `next` when it differs from what is published; forget unused compilations.
    fn publish(&mut self, next: BTreeMap<ApiRef, (String, Arc<CompiledSpec>)>) {
        let hashes = |m: &BTreeMap<ApiRef, (String, Arc<CompiledSpec>)>| {
            m.iter()
                .map(|(k, (h, _))| (k.clone(), h.clone()))
                .collect::<Vec<_>>()
        };
        let used: BTreeSet<&String> = next.values().map(|(h, _)| h).collect();
        self.compiled.retain(|h, _| used.contains(h));
        if hashes(&next) == hashes(&self.published) {
            return;
        }
        let set = next
            .iter()
            .map(|(k, (_, c))| (k.clone(), c.clone()))
            .collect();
        self.validators.store(Arc::new(ValidatorSet::new(set)));
        self.metrics.loaded.set(next.len() as i64);
        self.published = next;
    }
}

/// The documents the rules of routes bound to `gateway` validate with.
fn named<'a>(gateway: &str, routes: impl Iterator<Item = &'a HttpRouteSpec>) -> BTreeSet<ApiRef> {
    routes
        .filter(|r| r.binds(gateway))
        .flat_map(|r| r.rules.iter())
        .filter_map(|rule| rule.validation.as_ref().map(|v| v.spec.clone()))
        .collect()
}

/// For `policy apply`: each HTTPRoute among `docs` whose rules validate with a document must
/// name one stored in etcd, or one applied with it (`applied`). The errors name the route.
pub(crate) async fn check_routes(
    etcd: &Etcd,
    keys: &Keys,
    docs: &[&PolicyDocument],
    applied: &BTreeSet<ApiRef>,
) -> Result<Vec<String>, ApiError> {
    let mut problems = Vec::new();
    for doc in docs {
        let Ok(Policy::HttpRoute { spec, .. }) = doc.validate() else {
            continue;
        };
        for (i, rule) in spec.rules.iter().enumerate() {
            let Some(v) = &rule.validation else {
                continue;
            };
            if applied.contains(&v.spec) {
                continue;
            }
            match entry(etcd, keys, &v.spec.service, Some(&v.spec.version)).await {
                Ok(_) => {}
                Err(ApiError::NotFound(_)) => problems.push(format!(
                    "{}: rules[{i}].validation.spec: no OpenAPI document is stored for {} (see `mesh-agent api list`; store it with `mesh-agent api put`)",
                    doc.id(),
                    v.spec
                )),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(problems)
}
