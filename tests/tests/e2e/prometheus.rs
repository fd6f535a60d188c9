//! `examples/prometheus/` is kept correct by construction: promtool accepts the scrape config
//! and the rule files and passes the rules' unit tests; the Grafana dashboard is valid JSON
//! whose panels query recorded series only; and every `trellis_*` metric the rules read exists
//! in a real sidecar's `/metrics`, with the labels (and label values) the rules select on.
//!
//! promtool comes with Debian's `prometheus` package (`.ci/run` installs it); without it these
//! tests fail rather than pass unchecked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_norway::Value;
use trellis_tests::client;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prometheus")
}

/// Run promtool with `args` in `dir` and return its output; panic with that output unless it
/// succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool not found: install Debian's `prometheus` package (`apt-get install \
             prometheus`, as .ci/run does) to check examples/prometheus/"
        ),
        Err(e) => panic!("promtool {}: {e}", args.join(" ")),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}) in {}:\n{text}",
        args.join(" "),
        out.status,
        dir.display()
    );
    text
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `rules/*.yml` relative to the example directory: (rule files, their unit tests).
fn rule_files() -> (Vec<String>, Vec<String>) {
    let mut files: Vec<String> = std::fs::read_dir(example_dir().join("rules"))
        .expect("examples/prometheus/rules")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yml"))
        .map(|name| format!("rules/{name}"))
        .collect();
    files.sort();
    let (tests, rules) = files.into_iter().partition(|f| f.ends_with("_test.yml"));
    (rules, tests)
}

/// Every rule of the rule files: (`record` or `alert` name, expression).
fn rules() -> Vec<(String, String, String)> {
    let (files, _) = rule_files();
    let mut out = Vec::new();
    for file in files {
        let doc = yaml(&example_dir().join(&file));
        for group in doc["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                let expr = rule["expr"].as_str().expect("expr").to_string();
                let (kind, name) = match (rule.get("record"), rule.get("alert")) {
                    (Some(r), None) => ("record", r),
                    (None, Some(a)) => ("alert", a),
                    _ => panic!("{file}: a rule is a record or an alert: {rule:?}"),
                };
                let name = name.as_str().expect("rule name").to_string();
                out.push((kind.to_string(), name, expr));
            }
        }
    }
    out
}

fn recorded_names() -> BTreeSet<String> {
    rules()
        .into_iter()
        .filter(|(kind, ..)| kind == "record")
        .map(|(_, name, _)| name)
        .collect()
}

#[test]
fn promtool_accepts_the_config_and_rules_and_their_unit_tests_pass() {
    let dir = example_dir();
    let (rule_files, test_files) = rule_files();
    assert!(!rule_files.is_empty() && !test_files.is_empty());

    // The config loads exactly the rule files (not their tests, which are no rule files).
    let config = yaml(&dir.join("prometheus.yml"));
    let mut loaded: Vec<String> = config["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .map(|f| f.as_str().expect("rule file").to_string())
        .collect();
    loaded.sort();
    assert_eq!(loaded, rule_files, "prometheus.yml loads every rule file");

    let mut summary = promtool(&dir, &["check", "config", "prometheus.yml"]);
    let mut args = vec!["check", "rules"];
    args.extend(rule_files.iter().map(String::as_str));
    summary += &promtool(&dir, &args);
    let mut args = vec!["test", "rules"];
    args.extend(test_files.iter().map(String::as_str));
    let tested = promtool(&dir, &args);
    assert_eq!(
        tested.matches("SUCCESS").count(),
        test_files.len(),
        "{tested}"
    );
    summary += &tested;
    eprintln!("{summary}");

    // Every alert is tested both firing and quiet; every recorded series is checked, or feeds
    // one that is.
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut checked = String::new();
    for file in &test_files {
        let doc = yaml(&dir.join(file));
        for test in doc["tests"].as_sequence().expect("tests") {
            for t in test
                .get("alert_rule_test")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let name = t["alertname"].as_str().expect("alertname").to_string();
                let firing = t
                    .get("exp_alerts")
                    .and_then(Value::as_sequence)
                    .is_some_and(|a| !a.is_empty());
                (if firing { &mut fired } else { &mut quiet }).insert(name);
            }
            for t in test
                .get("promql_expr_test")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                checked += t["expr"].as_str().expect("expr");
                checked += "\n";
            }
        }
    }
    let all = rules();
    for (kind, name, _) in &all {
        match kind.as_str() {
            "alert" => assert!(
                fired.contains(name) && quiet.contains(name),
                "{name}: tested firing {}, tested quiet {}",
                fired.contains(name),
                quiet.contains(name)
            ),
            _ => {
                let feeds = all.iter().any(|(_, other, expr)| {
                    other != name && scan(expr).0.iter().any(|s| &s.name == name)
                });
                let tested = scan(&checked).0.iter().any(|s| &s.name == name);
                assert!(tested || feeds, "{name}: neither tested nor used by a rule");
            }
        }
    }
}

#[test]
fn grafana_dashboard_queries_recorded_series() {
    let path = example_dir().join("grafana/trellis-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));

    let vars = dash["templating"]["list"].as_array().expect("variables");
    let service = vars
        .iter()
        .find(|v| v["name"] == "service")
        .expect("a `service` variable");
    let query = service["query"]["query"].as_str().expect("its query");
    let args = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .expect("label_values(metric, label)");
    let (metric, label) = args.split_once(',').expect("two arguments");
    assert_eq!(label.trim(), "service");
    let recorded = recorded_names();
    assert!(recorded.contains(metric.trim()), "{metric}");

    let panels: Vec<&serde_json::Value> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(panels.len() >= 6, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().expect("title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id reused"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains(r#"service=~"$service""#),
                "{title}: {expr} ignores the service variable"
            );
            for s in scan(expr).0 {
                assert!(
                    recorded.contains(&s.name),
                    "{title}: {} is not a recorded series (rules/recording.yml)",
                    s.name
                );
            }
            exprs.push(expr.replace("$service", ".*"));
        }
    }
    // promtool parses every query, as recording rules of a scratch file.
    let dir = tempfile::tempdir().expect("temp dir");
    let rules: Vec<_> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:query:{i}"), "expr": e}))
        .collect();
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.path().join("dashboard.yml"), doc.to_string()).expect("write");
    promtool(dir.path(), &["check", "rules", "dashboard.yml"]);
}

/// Labels a scrape adds to every series: no sidecar exports them.
const TARGET_LABELS: [&str; 3] = ["job", "instance", "mesh_service"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_read_metrics_a_sidecar_exports() {
    let mesh = trellis_tests::Mesh::start().await;
    // One endpoint ejected at its first failure, and a rate limit of 2 a minute on /echo: the
    // traffic below makes every series the rules select on (5xx, 429, ejections).
    let doc = trellis_policies::parse_mesh_yaml(&format!(
        r#"
services:
  echo:
    endpoints: [{{address: "{}"}}]
    policy:
      retries: {{attempts: 0}}
      outlier_detection: {{consecutive_failures: 1}}
rate_limits:
  echo-burst:
    service: echo
    scope: local
    match: {{path: {{prefix: /echo}}}}
    limit: {{requests: 2, per: minute}}
"#,
        mesh.server.inbound()
    ))
    .expect("mesh document");
    let snap = trellis_tests::snapshot_of(&doc);
    mesh.server.apply(snap.clone()).await;
    mesh.client.apply(snap).await;

    let c = client::h1(mesh.client.outbound());
    let mut statuses = Vec::new();
    for uri in ["/echo", "/echo", "/echo", "/status/500", "/status/200"] {
        statuses.push(
            client::get(&c, &format!("http://echo{uri}"))
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429, 500, 200]);
    let admin = mesh.client.admin();
    trellis_tests::wait_for(Duration::from_secs(10), "the endpoint ejected", || async {
        let m = client::admin(admin, "/metrics").await.body;
        client::metric(
            &m,
            r#"trellis_outlier_events_total{service="echo",event="ejected"}"#,
        ) >= 1.0
    })
    .await;
    let mut exported = Exposition::default();
    for sidecar in [&mesh.server, &mesh.client] {
        exported.add(&client::admin(sidecar.admin(), "/metrics").await.body);
    }

    let recorded = recorded_names();
    let mut problems = Vec::new();
    let mut grouping = BTreeSet::new();
    for (_, rule, expr) in rules() {
        let (selectors, by) = scan(&expr);
        grouping.extend(by);
        for s in selectors {
            if s.name.contains(':') {
                if !recorded.contains(&s.name) {
                    problems.push(format!("{rule}: {} is not recorded", s.name));
                }
                continue;
            }
            if s.name == "up" {
                continue;
            }
            if !s.name.starts_with("trellis_") || !exported.names.contains(&s.name) {
                problems.push(format!("{rule}: no sidecar exports {}", s.name));
                continue;
            }
            let samples = exported.samples.get(&s.name).map(Vec::as_slice);
            for (label, op, value) in &s.matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let values: Vec<&str> = samples
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|l| l.get(label).map(String::as_str))
                    .collect();
                let matches = |v: &&str| match op.as_str() {
                    "=" => *v == value.as_str(),
                    "=~" => dot_match(value, v),
                    _ => true,
                };
                if !values.iter().any(matches) {
                    problems.push(format!(
                        "{rule}: {}{{{label}{op}\"{value}\"}} matches no exported series (values: {values:?})",
                        s.name
                    ));
                }
            }
        }
    }
    for label in grouping {
        let known = TARGET_LABELS.contains(&label.as_str())
            || exported
                .samples
                .values()
                .flatten()
                .any(|l| l.contains_key(&label));
        if !known {
            problems.push(format!("grouping by {label}: no exported series has it"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Whether `v` matches `pattern`, a regex of literal characters and `.` only (as the rules use).
fn dot_match(pattern: &str, v: &str) -> bool {
    assert!(
        pattern.chars().all(|c| c == '.' || c.is_alphanumeric()),
        "extend dot_match for {pattern}"
    );
    pattern.len() == v.len()
        && pattern
            .chars()
            .zip(v.chars())
            .all(|(p, c)| p == '.' || p == c)
}

/// The families and samples of Prometheus text.
#[derive(Default)]
struct Exposition {
    /// Sample names, and the names a `# TYPE` line implies (a counter's `_total`, a
    /// histogram's `_bucket`, `_sum` and `_count`).
    names: BTreeSet<String>,
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exposition {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    "summary" => &["_sum", "_count"],
                    _ => &[""],
                };
                for s in suffixes {
                    self.names.insert(format!("{name}{s}"));
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let chars: Vec<char> = line.chars().collect();
            let end = chars
                .iter()
                .position(|&c| c == '{' || c == ' ')
                .expect("sample");
            let name: String = chars[..end].iter().collect();
            let mut labels = Vec::new();
            if chars[end] == '{' {
                parse_matchers(&chars, end + 1, &mut labels);
            }
            let labels = labels.into_iter().map(|(k, _, v)| (k, v)).collect();
            self.names.insert(name.clone());
            self.samples.entry(name).or_default().push(labels);
        }
    }
}

/// A series selector in PromQL: a metric name and its label matchers (label, op, value).
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

const AGGREGATIONS: [&str; 12] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
const KEYWORDS: [&str; 5] = ["and", "or", "unless", "bool", "offset"];
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The series selectors of a PromQL expression (Grafana's `$variables` skipped) and the labels
/// it groups or matches by. Enough of PromQL for the rules and queries here: string literals,
/// numbers and durations, functions, aggregations and their `by`, binary operators and their
/// `on`/`group_left`.
fn scan(expr: &str) -> (Vec<Selector>, BTreeSet<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let (mut selectors, mut grouping) = (Vec::new(), BTreeSet::new());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i = string_end(&chars, i).0;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, a number or a duration.
            i += 1;
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = (i..chars.len()).find(|&j| !chars[j].is_whitespace());
            let next_char = next.map(|j| chars[j]);
            if GROUPING.contains(&word.as_str()) {
                if let (Some(open), Some('(')) = (next, next_char) {
                    let close = (open..chars.len())
                        .find(|&j| chars[j] == ')')
                        .expect("closing parenthesis");
                    let labels: String = chars[open + 1..close].iter().collect();
                    grouping.extend(
                        labels
                            .split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(String::from),
                    );
                    i = close + 1;
                }
            } else if next_char == Some('(')
                || AGGREGATIONS.contains(&word.as_str())
                || KEYWORDS.contains(&word.as_str())
            {
                // A function, an aggregation or an operator.
            } else {
                let mut matchers = Vec::new();
                if let (Some(open), Some('{')) = (next, next_char) {
                    i = parse_matchers(&chars, open + 1, &mut matchers);
                }
                selectors.push(Selector {
                    name: word,
                    matchers,
                });
            }
        } else {
            i += 1;
        }
    }
    (selectors, grouping)
}

/// Parse `label op "value", ...}` from `i` (just after the `{`); return the index after `}`.
fn parse_matchers(chars: &[char], mut i: usize, out: &mut Vec<(String, String, String)>) -> usize {
    loop {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        if i >= chars.len() || chars[i] == '}' {
            return i + 1;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        let op_start = i;
        while i < chars.len() && matches!(chars[i], '=' | '!' | '~' | ' ') {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().filter(|c| **c != ' ').collect();
        let (end, value) = string_end(chars, i);
        assert!(!label.is_empty() && !op.is_empty(), "matcher at {start}");
        out.push((label, op, value));
        i = end;
    }
}

/// The string literal opening at `i`: the index after it and its unescaped value.
fn string_end(chars: &[char], i: usize) -> (usize, String) {
    let quote = chars[i];
    let mut value = String::new();
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' {
            j += 1;
        }
        if let Some(&c) = chars.get(j) {
            value.push(c);
        }
        j += 1;
    }
    (j + 1, value)
}

#[test]
fn the_scanner_finds_selectors_and_grouping_labels() {
    let (s, by) = scan(
        r#"sum by (service, le) (rate(trellis_x_bucket{direction="inbound",status_code=~"5.."}[5m] offset 1h))
           / on (service) group_left label_replace(up{mesh_service!=""}, "service", "$1", "mesh_service", "(.*)")
           or 0 * a:b:c{service=~"$service"} > bool 1e-3"#,
    );
    let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["trellis_x_bucket", "up", "a:b:c"]);
    assert_eq!(
        s[0].matchers,
        [
            ("direction".into(), "=".into(), "inbound".into()),
            ("status_code".into(), "=~".into(), "5..".into())
        ]
    );
    assert_eq!(s[2].matchers[0].2, "$service");
    assert_eq!(
        by.into_iter().collect::<Vec<_>>(),
        ["le", "service"].map(String::from)
    );
    assert!(dot_match("5..", "503") && !dot_match("5..", "429"));
}
