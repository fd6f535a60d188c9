//! Just enough of the Prometheus text format to read the sidecars' own `/metrics`: samples
//! with labels, and quantiles from cumulative histogram buckets (as PromQL's
//! `histogram_quantile`: linear within the bucket).

use std::collections::BTreeMap;

/// One sample: metric name, labels (sorted), value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parse the text; lines that do not parse are skipped (comments, `# EOF`, exemplars).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, close) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, &line[open + 1 + close..])
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Labels after `{`; returns them and the offset just past the closing `}`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, usize)> {
    let mut labels = BTreeMap::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    loop {
        while bytes.get(i).is_some_and(|b| *b == b',' || *b == b' ') {
            i += 1;
        }
        if bytes.get(i) == Some(&b'}') {
            return Some((labels, i + 1));
        }
        let eq = s[i..].find('=')? + i;
        let key = s[i..eq].trim().to_string();
        if bytes.get(eq + 1) != Some(&b'"') {
            return None;
        }
        let mut value = String::new();
        let mut j = eq + 2;
        loop {
            match *bytes.get(j)? {
                b'\\' => {
                    match *bytes.get(j + 1)? {
                        b'n' => value.push('\n'),
                        other => value.push(other as char),
                    }
                    j += 2;
                }
                b'"' => break,
                _ => {
                    // Copy one UTF-8 character.
                    let ch = s[j..].chars().next()?;
                    value.push(ch);
                    j += ch.len_utf8();
                }
            }
        }
        labels.insert(key, value);
        i = j + 1;
    }
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
