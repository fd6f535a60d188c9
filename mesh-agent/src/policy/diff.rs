//! A small line diff for `policy history`.
//!
//! Policy documents are tens of lines, so a textbook LCS table is plenty and keeps a diff
//! crate (and a `Cargo.lock` change shared with everyone else's work) out of the build. Inputs
//! too large for the table fall back to "every old line removed, every new line added", which
//! is still a correct, if unhelpful, diff.

/// Lines of context kept around each change.
const CONTEXT: usize = 2;
/// Largest LCS table (old lines x new lines) computed; about 16 MiB of `u32`.
const MAX_CELLS: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Same,
    Removed,
    Added,
}

/// `-`/`+`/` ` prefixed lines with [`CONTEXT`] lines around each change; runs of unchanged
/// lines beyond that are shown as one `@@` line. Empty when both texts are equal.
pub fn unified(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let ops = script(&a, &b);
    if ops.iter().all(|(op, _)| *op == Op::Same) {
        return Vec::new();
    }
    let changed: Vec<bool> = ops.iter().map(|(op, _)| *op != Op::Same).collect();
    let near_change = |i: usize| {
        let lo = i.saturating_sub(CONTEXT);
        let hi = (i + CONTEXT + 1).min(changed.len());
        changed[lo..hi].iter().any(|c| *c)
    };
    let mut out = Vec::new();
    let mut skipped = 0usize;
    for (i, (op, line)) in ops.iter().enumerate() {
        if *op == Op::Same && !near_change(i) {
            skipped += 1;
            continue;
        }
        if skipped > 0 {
            out.push(format!("@@ {skipped} unchanged line(s) @@"));
            skipped = 0;
        }
        let sign = match op {
            Op::Same => ' ',
            Op::Removed => '-',
            Op::Added => '+',
        };
        out.push(format!("{sign}{line}"));
    }
    if skipped > 0 {
        out.push(format!("@@ {skipped} unchanged line(s) @@"));
    }
    out
}

/// The edit script from `a` to `b` through a longest common subsequence.
fn script<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<(Op, &'a str)> {
    if a.len().saturating_mul(b.len()) > MAX_CELLS {
        let removed = a.iter().map(|l| (Op::Removed, *l));
        return removed.chain(b.iter().map(|l| (Op::Added, *l))).collect();
    }
    // lcs[i][j]: length of the LCS of a[i..] and b[j..], in one flat table.
    let w = b.len() + 1;
    let mut lcs = vec![0u32; (a.len() + 1) * w];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i * w + j] = if a[i] == b[j] {
                lcs[(i + 1) * w + j + 1] + 1
            } else {
                lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut ops = Vec::with_capacity(a.len() + b.len());
    while i < a.len() && j < b.len() {
        if a[i] == b[j] {
            ops.push((Op::Same, a[i]));
            i += 1;
            j += 1;
        } else if lcs[(i + 1) * w + j] >= lcs[i * w + j + 1] {
            ops.push((Op::Removed, a[i]));
            i += 1;
        } else {
            ops.push((Op::Added, b[j]));
            j += 1;
        }
    }
    ops.extend(a[i..].iter().map(|l| (Op::Removed, *l)));
    ops.extend(b[j..].iter().map(|l| (Op::Added, *l)));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_diff() {
        assert!(unified("a\nb\n", "a\nb\n").is_empty());
    }

    #[test]
    fn one_changed_line_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\n";
        let new = "a\nb\nc\nD\ne\nf\ng\n";
        assert_eq!(
            unified(old, new),
            [
                "@@ 1 unchanged line(s) @@",
                " b",
                " c",
                "-d",
                "+D",
                " e",
                " f",
                "@@ 1 unchanged line(s) @@"
            ]
        );
    }

    #[test]
    fn creation_and_deletion() {
        assert_eq!(unified("", "x\ny\n"), ["+x", "+y"]);
        assert_eq!(unified("x\n", ""), ["-x"]);
    }

    #[test]
    fn insertion_keeps_common_lines() {
        assert_eq!(unified("a\nc\n", "a\nb\nc\n"), [" a", "+b", " c"]);
    }
}
