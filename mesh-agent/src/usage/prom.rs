//! The sidecars' own `/metrics` as samples with sorted labels, and quantiles from cumulative
//! histogram buckets (as PromQL's
//! `histogram_quantile`: linear within the bucket).

use std::collections::BTreeMap;

/// One sample: metric name, labels (sorted), value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parse the text; lines that do not parse are skipped (comments, `# EOF`, a malformed line).
/// The line grammar is the data plane's own reader (`trellis_proxy::telemetry::exposition`).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| trellis_proxy::telemetry::exposition::parse(line).ok())
        .flat_map(|e| e.samples)
        .map(|s| Sample {
            name: s.name.to_string(),
            labels: s
                .labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_owned()))
                .collect(),
            value: s.value,
        })
        .collect()
}

/// The `q` quantile of a histogram given as cumulative `(upper bound, count)` buckets sorted
/// by bound (the last is `+Inf`). `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Above the largest finite bound: report that bound, as Prometheus does.
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(prev.0 + (le - prev.0) * (rank - prev.1) / in_bucket);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_escaped_labels() {
        let text = "# HELP x y\n# TYPE a counter\na_total{k=\"v\",q=\"a\\\"b\"} 3\nb 1.5\nc{le=\"+Inf\"} 7 1700000000\n# EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "a_total");
        assert_eq!(s[0].labels["q"], "a\"b");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].value, 1.5);
        assert_eq!(s[2].labels["le"], "+Inf");
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // 10 observations at or below 0.1, 10 more up to 0.2.
        let b = [(0.1, 10.0), (0.2, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(quantile(0.5, &b), Some(0.1));
        let p75 = quantile(0.75, &b).expect("p75");
        assert!((p75 - 0.15).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(0.5, &[(f64::INFINITY, 0.0)]), None);
    }
}
