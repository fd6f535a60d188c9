//! How `policy history` prints a policy's history: a table with the YAML diff of each change
//! under its row, or JSON for scripts.

use serde_json::{json, Value};

use super::diff;
use super::history::{Action, Recorded};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// A stored value as YAML, the way `policy get` shows it; empty when absent.
fn yaml(v: Option<&Value>) -> String {
    v.map_or_else(String::new, |v| {
        serde_norway::to_string(v).unwrap_or_default()
    })
}

fn action(r: &Recorded) -> String {
    match (r.entry.action, r.entry.from_revision) {
        (Action::Rollback, Some(from)) => format!("rollback to {from}"),
        (Action::Rollback, None) => "rollback".into(),
        (Action::Apply, _) if r.entry.previous.is_none() => "apply (created)".into(),
        (Action::Apply, _) => "apply".into(),
        (Action::Delete, _) => "delete".into(),
    }
}

/// The change an entry records, as diff lines from the previous to the new YAML.
pub fn diff_lines(r: &Recorded) -> Vec<String> {
    diff::unified(
        &yaml(r.entry.previous.as_ref()),
        &yaml(r.entry.new.as_ref()),
    )
}

/// Whether the value an entry replaced is not the one the entry before it wrote: someone wrote
/// the policy around `mesh-agent` (e.g. with etcdctl) in between, which the history cannot
/// attribute but can point out.
fn changed_outside(entries: &[Recorded], i: usize) -> bool {
    i > 0 && entries[i].entry.previous != entries[i - 1].entry.new
}

pub fn render(reference: &str, entries: &[Recorded], format: OutputFormat) -> String {
    match format {
        OutputFormat::Table => table(reference, entries),
        OutputFormat::Json => {
            let rows: Vec<Value> = entries
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    json!({
                        "revision": r.revision,
                        "time": r.entry.time,
                        "author": r.entry.author,
                        "action": r.entry.action,
                        "from_revision": r.entry.from_revision,
                        "previous": r.entry.previous,
                        "new": r.entry.new,
                        "diff": diff_lines(r),
                        "changed_outside": changed_outside(entries, i),
                    })
                })
                .collect();
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        }
    }
}

fn table(reference: &str, entries: &[Recorded]) -> String {
    if entries.is_empty() {
        return format!("no history recorded for {reference}");
    }
    let author_w = entries
        .iter()
        .map(|r| r.entry.author.chars().count())
        .max()
        .unwrap_or(0)
        .max("AUTHOR".len());
    let mut out = format!(
        "{:<10} {:<20}  {:<author_w$}  ACTION\n",
        "REVISION", "TIME", "AUTHOR"
    );
    for (i, r) in entries.iter().enumerate() {
        out.push_str(&format!(
            "{:<10} {:<20}  {:<author_w$}  {}\n",
            r.revision,
            r.entry.time,
            r.entry.author,
            action(r)
        ));
        if changed_outside(entries, i) {
            out.push_str("    ! written outside mesh-agent since the previous entry; diff from the value replaced\n");
        }
        for line in diff_lines(r) {
            out.push_str("    ");
            out.push_str(&line);
            out.push('\n');
        }
    }
    out.truncate(out.trim_end().len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::history::HistoryEntry;

    fn rec(revision: i64, action: Action, prev: Option<Value>, new: Option<Value>) -> Recorded {
        Recorded {
            revision,
            entry: HistoryEntry {
                author: "alice".into(),
                time: "2026-01-01T00:00:00Z".into(),
                action,
                previous: prev,
                new,
                from_revision: None,
            },
        }
    }

    #[test]
    fn table_shows_rows_and_diffs() {
        let v1 = json!({"spec": {"request_timeout": "1s"}});
        let v2 = json!({"spec": {"request_timeout": "2s"}});
        let rows = [
            rec(5, Action::Apply, None, Some(v1.clone())),
            rec(9, Action::Apply, Some(v1), Some(v2.clone())),
            rec(12, Action::Delete, Some(v2), None),
        ];
        let t = render("ServicePolicy/orders", &rows, OutputFormat::Table);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("REVISION"), "{t}");
        assert!(
            lines[1].starts_with("5 ") && lines[1].ends_with("apply (created)"),
            "{t}"
        );
        assert!(
            t.contains("    -  request_timeout: 1s\n    +  request_timeout: 2s"),
            "{t}"
        );
        assert!(t.contains("12 ") && t.contains("delete"), "{t}");
        let j: Value = serde_json::from_str(&render("x", &rows, OutputFormat::Json)).unwrap();
        assert_eq!(j[2]["action"], "delete");
        assert_eq!(j[2]["new"], Value::Null);
        assert_eq!(j[1]["diff"][1], "-  request_timeout: 1s");
        assert_eq!(j[1]["changed_outside"], false);
    }

    #[test]
    fn writes_around_the_cli_are_pointed_out() {
        let v = |t: &str| Some(json!({"spec": {"request_timeout": t}}));
        let rows = [
            rec(5, Action::Apply, None, v("1s")),
            rec(9, Action::Apply, v("7s"), v("2s")),
        ];
        let t = render("x", &rows, OutputFormat::Table);
        assert!(t.contains("! written outside mesh-agent"), "{t}");
        let j: Value = serde_json::from_str(&render("x", &rows, OutputFormat::Json)).unwrap();
        assert_eq!(j[0]["changed_outside"], false);
        assert_eq!(j[1]["changed_outside"], true);
    }
}
