//! JWT metrics, labelled by provider name (operator-declared, so the label set is bounded by
//! the policies, never by token contents) and by result (`ok` or a [`JwtError::reason`]).
//!
//! An authenticator resolves its counters once when it is built, so counting a verdict on the
//! request path is one atomic add, without building labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::JwtError;

/// Provider label for tokens refused before a provider was chosen (malformed, unknown issuer).
pub const NO_PROVIDER: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    provider: String,
    result: &'static str,
}

/// The JWT metric families; clones share them. `Default` gives unregistered families (tests).
#[derive(Clone, Default)]
pub struct AuthMetrics {
    verdicts: Family<ResultLabels, Counter>,
    fetches: Family<ResultLabels, Counter>,
}

/// One provider's verdict counters: `ok` then one per [`JwtError::ALL`].
#[derive(Clone)]
pub(crate) struct Verdicts {
    ok: Counter,
    refused: [Counter; JwtError::ALL.len()],
}

/// One provider's JWKS fetch counters.
#[derive(Clone)]
pub(crate) struct FetchCounters {
    pub(crate) ok: Counter,
    pub(crate) error: Counter,
}

// === impl AuthMetrics ===

impl AuthMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "jwt_authentications",
            "JWT verifications by provider and result (ok or the refusal reason)",
            m.verdicts.clone(),
        );
        registry.register(
            "jwks_fetches",
            "JWKS fetches by provider and result (ok, error)",
            m.fetches.clone(),
        );
        m
    }

    pub(crate) fn verdicts(&self, provider: &str) -> Verdicts {
        let get = |result| {
            self.verdicts
                .get_or_create(&ResultLabels {
                    provider: provider.to_string(),
                    result,
                })
                .clone()
        };
        Verdicts {
            ok: get("ok"),
            refused: JwtError::ALL.map(|e| get(e.reason())),
        }
    }

    pub(crate) fn fetch_counters(&self, provider: &str) -> FetchCounters {
        let get = |result| {
            self.fetches
                .get_or_create(&ResultLabels {
                    provider: provider.to_string(),
                    result,
                })
                .clone()
        };
        FetchCounters {
            ok: get("ok"),
            error: get("error"),
        }
    }
}

// === impl Verdicts ===

impl Verdicts {
    pub(crate) fn record<T>(&self, result: &Result<T, JwtError>) {
        match result {
            Ok(_) => self.ok.inc(),
            Err(e) => self.refused[e.index()].inc(),
        };
    }
}
