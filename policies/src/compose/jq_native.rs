//! A native fast path for a subset of jq: the reshapes and filters public contracts ask for
//! (`.`, `.a.b`, `.[]`, `.[n]`, `|`, `,`, `[...]`, `{k, k: f}`, `+ - *`, `add`, `map(f)`,
//! string and integer literals, `null`/`true`/`false`, `"\(f)"` interpolation, `==` `!=` `<`
//! `<=` `>` `>=`, `and`/`or`/`not`, `//`, `if ... then ... elif ... else ... end`,
//! `select(f)`, `empty`, `values`, `length`, `keys`, `keys_unsorted`, `has(k)`, `type`,
//! `tostring`, `to_entries`, `from_entries`, `with_entries(f)`, `join(s)`, `first`, `last`,
//! `del(.a.b)`), run on values that borrow their strings from the body instead of jaq's
//! reference-counted, individually boxed ones.
//!
//! Why our own code and not a crate: jaq is the jq we run, and no other jq crate gives jaq's
//! output byte for byte; what costs here is jaq's value model (two allocations per string, an
//! `IndexMap` and an `Rc` per object, a boxed iterator per operation: about 55 % of the
//! instructions in glibc's allocator, docs/composition.md#cost), not its language. So this
//! module reads the same parse tree as jaq (`jaq_core::load::parse`), accepts only the
//! constructs listed above, and gives up ([`Bail`]) on anything else: a program outside the
//! subset is never compiled here, and at run time any case whose result could differ from
//! jaq's (an error, a number that needs jaq's big integers, an object over [`MAX_KEYS`] keys,
//! a stream where one value is expected, invalid JSON) makes the caller run jaq on the same
//! body. The output is then byte for byte what jaq and `jq::write` give; the differential test
//! in `jq.rs` checks that over many programs and bodies.

use std::rc::Rc;

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Term};
use jaq_core::ops::Math;
use jaq_core::path::{Opt, Part};
use serde::de::{self, Deserializer as _};

/// Objects with more keys fall back to jaq (keys are found by a linear scan here).
const MAX_KEYS: usize = 64;

/// The fast path does not apply to this body or program: run jaq.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Bail;

/// A compiled program of the subset; plain data, shared across threads.
#[derive(Debug)]
pub(super) enum Node {
    Id,
    Null,
    Bool(bool),
    Int(i64),
    Str(Box<str>),
    /// `f.a[].b`: the outputs of `f`, each followed along the path.
    Path(Box<Node>, Vec<Step>),
    /// `[f]` (`None`: `[]`).
    Arr(Option<Box<Node>>),
    /// `{k: f, ...}`, each value a single output.
    Obj(Vec<(Box<str>, Node)>),
    Pipe(Box<Node>, Box<Node>),
    Comma(Box<Node>, Box<Node>),
    Math(Box<Node>, Op, Box<Node>),
    /// `add`: `reduce .[] as $x (null; . + $x)`.
    Add,
    /// `map(f)`: `[.[] | f]`.
    Map(Box<Node>),
    /// `empty`.
    Empty,
    /// `l // r`: the outputs of `l` that are neither `null` nor `false`; if none, `r`'s.
    Alt(Box<Node>, Box<Node>),
    /// `l and r` (`false`: the value that stops), `l or r` (`true`), as jaq: for each output
    /// of `l`, the stop value or each output of `r` as a boolean.
    Logic(Box<Node>, bool, Box<Node>),
    /// `l == r`, `l < r`...: jaq's cartesian product, `l` outer.
    Cmp(Box<Node>, Cmp, Box<Node>),
    /// `if c then t else e end` (and `elif`; no `else` is `.`), for each output of `c`;
    /// `select(f)` is `if f then . else empty end`.
    Ite(Box<Node>, Box<Node>, Box<Node>),
    /// `not`.
    Not,
    /// `length`.
    Length,
    /// `keys` (sorted: `true`) and `keys_unsorted`.
    Keys(bool),
    /// `has(k)`.
    Has(Box<Node>),
    /// `to_entries`.
    ToEntries,
    /// `from_entries`.
    FromEntries,
    /// `type`.
    Type,
    /// `join(s)`.
    Join(Box<Node>),
    /// `del(.a.b)`: a path of object keys only.
    Del(Vec<Box<str>>),
    /// `"text \(f) text"` and `tostring` (`"\(.)"`).
    Interp(Vec<Piece>),
}

/// A part of an interpolated string.
#[derive(Debug)]
pub(super) enum Piece {
    Lit(Box<str>),
    Term(Node),
}

/// jaq's comparison operators.
#[derive(Clone, Copy, Debug)]
pub(super) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug)]
pub(super) enum Step {
    Key(Box<str>),
    /// `.[n]`: negative from the end, out of range `null` (jaq's `abs_index`).
    Index(i64),
    Iter,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    Add,
    Sub,
    Mul,
}

/// A value during one transform: strings borrowed from the body (or the program) where they
/// have no escapes, containers shared by `Rc` so that a path or `.[]` copies no subtree.
#[derive(Clone, Debug)]
enum V<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(S<'a>),
    Arr(Rc<Vec<V<'a>>>),
    Obj(Rc<Vec<(S<'a>, V<'a>)>>),
}

#[derive(Clone, Debug)]
enum S<'a> {
    B(&'a str),
    O(Rc<str>),
}

impl S<'_> {
    fn as_str(&self) -> &str {
        match self {
            S::B(s) => s,
            S::O(s) => s,
        }
    }
}

/// Why a run stopped early: the fast path gave up, or the first output is in.
enum Stop {
    Bail,
    Done,
}

impl From<Bail> for Stop {
    fn from(_: Bail) -> Self {
        Stop::Bail
    }
}

type Out<'o, 'a> = &'o mut dyn FnMut(V<'a>) -> Result<(), Stop>;

/// A transform's native form: its field operations (as `transform.rs` writes them in jq),
/// then a program of the subset.
#[derive(Debug)]
pub(super) struct Program {
    remove: Vec<Vec<Seg>>,
    rename: Vec<(Vec<Seg>, Vec<Seg>)>,
    add: Vec<(Vec<Seg>, serde_json::Value)>,
    node: Node,
}

/// A JSON pointer's segment as `transform::jq_path` makes it: up to 9 digits index arrays.
#[derive(Debug)]
enum Seg {
    Key(Box<str>),
    Index(usize),
}

/// The program in the subset, or `None` (jaq runs it).
pub(super) fn compile(code: &str) -> Option<Program> {
    let term = jaq_core::load::parse(code, |p| p.term())?;
    Some(Program {
        remove: Vec::new(),
        rename: Vec::new(),
        add: Vec::new(),
        node: node(&term)?,
    })
}

/// Field operations (pointers already checked by `transform.rs`) followed by `jq`, or `None`.
pub(super) fn compile_with_fields<'s>(
    remove: impl IntoIterator<Item = &'s String>,
    rename: impl IntoIterator<Item = (&'s String, &'s String)>,
    add: impl IntoIterator<Item = (&'s String, &'s serde_json::Value)>,
    jq: &str,
) -> Option<Program> {
    let mut program = compile(jq)?;
    program.remove = remove.into_iter().map(|p| segs(p)).collect::<Option<_>>()?;
    program.rename = rename
        .into_iter()
        .map(|(f, t)| Some((segs(f)?, segs(t)?)))
        .collect::<Option<_>>()?;
    program.add = add
        .into_iter()
        .map(|(p, v)| Some((segs(p)?, fits(v).then(|| v.clone())?)))
        .collect::<Option<_>>()?;
    Some(program)
}

fn segs(pointer: &str) -> Option<Vec<Seg>> {
    let rest = pointer.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|seg| {
                let seg = seg.replace("~1", "/").replace("~0", "~");
                match seg.parse::<usize>() {
                    Ok(i) if seg.len() <= 9 && seg.bytes().all(|b| b.is_ascii_digit()) => {
                        Seg::Index(i)
                    }
                    _ => Seg::Key(seg.into()),
                }
            })
            .collect(),
    )
}

/// Whether an `add` value reads the same here as jaq reads it as a jq literal (integers that
/// jaq would hold as big integers do not).
fn fits(v: &serde_json::Value) -> bool {
    match v {
        // jaq keeps a literal that is not an integer as its text (`1e+100`), printed as it
        // is: only floats whose text is what this module prints (`ryu`'s) fit.
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                f.is_finite() && n.to_string() == ryu::Buffer::new().format_finite(f)
            }
            _ => n.as_i64().is_some_and(|i| i != i64::MIN),
        },
        serde_json::Value::Array(a) => a.iter().all(fits),
        serde_json::Value::Object(o) => o.len() <= MAX_KEYS && o.values().all(fits),
        _ => true,
    }
}

fn from_json(v: &serde_json::Value) -> V<'_> {
    use serde_json::Value;
    match v {
        Value::Null => V::Null,
        Value::Bool(b) => V::Bool(*b),
        Value::Number(n) => n
            .as_i64()
            .map_or_else(|| V::Float(n.as_f64().unwrap_or(0.0)), V::Int),
        Value::String(s) => V::Str(S::B(s)),
        Value::Array(a) => V::Arr(Rc::new(a.iter().map(from_json).collect())),
        Value::Object(o) => V::Obj(Rc::new(
            o.iter()
                .map(|(k, v)| (S::B(k.as_str()), from_json(v)))
                .collect(),
        )),
    }
}

fn node(t: &Term<&str>) -> Option<Node> {
    Some(match t {
        Term::Id => Node::Id,
        // jaq reads an integer literal into a machine integer (`isize`, 64 bits here); other
        // literals are decimals kept as text, not in the subset.
        Term::Num(n) => Node::Int(n.parse::<i64>().ok()?),
        // `-1`: jaq negates the integer.
        Term::Neg(n) => match &**n {
            Term::Num(n) => Node::Int(n.parse::<i64>().ok()?.checked_neg()?),
            _ => return None,
        },
        Term::Str(None, parts) => match literal(t) {
            Some(s) => Node::Str(s.into()),
            None => Node::Interp(pieces(parts)?),
        },
        Term::IfThenElse(branches, otherwise) => {
            let mut e = match otherwise {
                Some(e) => node(e)?,
                None => Node::Id,
            };
            for (c, t) in branches.iter().rev() {
                e = Node::Ite(Box::new(node(c)?), Box::new(node(t)?), Box::new(e));
            }
            e
        }
        Term::Arr(None) => Node::Arr(None),
        Term::Arr(Some(f)) => Node::Arr(Some(Box::new(node(f)?))),
        Term::Obj(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let key: Box<str> = literal(k)?.into();
                let value = match v {
                    Some(v) => node(v)?,
                    // `{k}` is `{k: .k}`.
                    None => Node::Path(Box::new(Node::Id), vec![Step::Key(key.clone())]),
                };
                out.push((key, value));
            }
            Node::Obj(out)
        }
        Term::BinOp(l, op, r) => {
            let (l, r) = (Box::new(node(l)?), Box::new(node(r)?));
            match op {
                BinaryOp::Pipe(None) => Node::Pipe(l, r),
                BinaryOp::Comma => Node::Comma(l, r),
                BinaryOp::Math(Math::Add) => Node::Math(l, Op::Add, r),
                BinaryOp::Math(Math::Sub) => Node::Math(l, Op::Sub, r),
                BinaryOp::Math(Math::Mul) => Node::Math(l, Op::Mul, r),
                BinaryOp::Alt => Node::Alt(l, r),
                BinaryOp::And => Node::Logic(l, false, r),
                BinaryOp::Or => Node::Logic(l, true, r),
                BinaryOp::Cmp(c) => Node::Cmp(
                    l,
                    match c {
                        jaq_core::ops::Cmp::Eq => Cmp::Eq,
                        jaq_core::ops::Cmp::Ne => Cmp::Ne,
                        jaq_core::ops::Cmp::Lt => Cmp::Lt,
                        jaq_core::ops::Cmp::Le => Cmp::Le,
                        jaq_core::ops::Cmp::Gt => Cmp::Gt,
                        jaq_core::ops::Cmp::Ge => Cmp::Ge,
                    },
                    r,
                ),
                _ => return None,
            }
        }
        Term::Call(name, args) => match (*name, &args[..]) {
            ("null", []) => Node::Null,
            ("true", []) => Node::Bool(true),
            ("false", []) => Node::Bool(false),
            ("add", []) => Node::Add,
            ("map", [f]) => Node::Map(Box::new(node(f)?)),
            ("empty", []) => Node::Empty,
            ("not", []) => Node::Not,
            ("length", []) => Node::Length,
            ("keys", []) => Node::Keys(true),
            ("keys_unsorted", []) => Node::Keys(false),
            ("has", [k]) => Node::Has(Box::new(node(k)?)),
            ("to_entries", []) => Node::ToEntries,
            ("from_entries", []) => Node::FromEntries,
            // `to_entries | map(f) | from_entries`.
            ("with_entries", [f]) => Node::Pipe(
                Box::new(Node::ToEntries),
                Box::new(Node::Pipe(
                    Box::new(Node::Map(Box::new(node(f)?))),
                    Box::new(Node::FromEntries),
                )),
            ),
            ("type", []) => Node::Type,
            ("join", [sep]) => Node::Join(Box::new(node(sep)?)),
            ("tostring", []) => Node::Interp(vec![Piece::Term(Node::Id)]),
            ("select", [f]) => Node::Ite(
                Box::new(node(f)?),
                Box::new(Node::Id),
                Box::new(Node::Empty),
            ),
            // `select(. != null)`.
            ("values", []) => Node::Ite(
                Box::new(Node::Cmp(Box::new(Node::Id), Cmp::Ne, Box::new(Node::Null))),
                Box::new(Node::Id),
                Box::new(Node::Empty),
            ),
            ("first", []) => Node::Path(Box::new(Node::Id), vec![Step::Index(0)]),
            ("last", []) => Node::Path(Box::new(Node::Id), vec![Step::Index(-1)]),
            ("del", [f]) => Node::Del(key_path(f)?),
            _ => return None,
        },
        Term::Path(base, path) => {
            let mut steps = Vec::with_capacity(path.0.len());
            for (part, opt) in &path.0 {
                if !matches!(opt, Opt::Essential) {
                    return None;
                }
                steps.push(match part {
                    Part::Index(Term::Num(n)) => Step::Index(n.parse().ok()?),
                    Part::Index(Term::Neg(n)) => match &**n {
                        Term::Num(n) => Step::Index(n.parse::<i64>().ok()?.checked_neg()?),
                        _ => return None,
                    },
                    Part::Index(k) => Step::Key(literal(k)?.into()),
                    Part::Range(None, None) => Step::Iter,
                    Part::Range(..) => return None,
                });
            }
            Node::Path(Box::new(node(base)?), steps)
        }
        _ => return None,
    })
}

/// The parts of a string with interpolations (no format such as `@base64`).
fn pieces(parts: &[StrPart<&str, Term<&str>>]) -> Option<Vec<Piece>> {
    let mut out = Vec::with_capacity(parts.len());
    let mut text = String::new();
    for part in parts {
        match part {
            StrPart::Str(p) => text.push_str(p),
            StrPart::Char(c) => text.push(*c),
            StrPart::Term(t) => {
                if !text.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut text).into()));
                }
                out.push(Piece::Term(node(t)?));
            }
        }
    }
    if !text.is_empty() {
        out.push(Piece::Lit(text.into()));
    }
    Some(out)
}

/// `.a.b."c"`: a path of object keys from `.` (what `del` takes natively).
fn key_path(t: &Term<&str>) -> Option<Vec<Box<str>>> {
    let Term::Path(base, path) = t else {
        return None;
    };
    if !matches!(**base, Term::Id) || path.0.is_empty() {
        return None;
    }
    path.0
        .iter()
        .map(|(part, opt)| match (part, opt) {
            (Part::Index(k), Opt::Essential) => literal(k).map(Into::into),
            _ => None,
        })
        .collect()
}

/// A string literal without interpolation or format.
fn literal(t: &Term<&str>) -> Option<String> {
    let Term::Str(None, parts) = t else {
        return None;
    };
    let mut s = String::new();
    for part in parts {
        match part {
            StrPart::Str(p) => s.push_str(p),
            StrPart::Char(c) => s.push(*c),
            StrPart::Term(_) => return None,
        }
    }
    Some(s)
}

// === run ===

/// Parse `body`, run `program`, write its first output as compact JSON; [`Bail`] whenever
/// jaq must decide, and for any body that `jq::check` would refuse: serde_json's reader
/// refuses what is not UTF-8 (outside strings as a syntax error, inside them by its own
/// check), and the reader here anything nested deeper than `jq::MAX_DEPTH`, so no scan of the
/// body comes first.
pub(super) fn apply(program: &Program, body: &[u8]) -> Result<Vec<u8>, Bail> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut input = de.deserialize_any(Visit(0)).map_err(|_| Bail)?;
    de.end().map_err(|_| Bail)?;
    for p in &program.remove {
        remove(&mut input, p);
    }
    for (from, to) in &program.rename {
        let v = get(&input, from)?;
        if !matches!(v, V::Null) {
            remove(&mut input, from);
            set(&mut input, to, v)?;
        }
    }
    for (p, v) in &program.add {
        set(&mut input, p, from_json(v))?;
    }
    let mut first = None;
    let r = program.node.run(input, &mut |v| {
        first = Some(v);
        Err(Stop::Done)
    });
    match (r, first) {
        (Err(Stop::Done), Some(v)) => {
            let mut out = Vec::with_capacity(body.len());
            write(&mut out, &v);
            Ok(out)
        }
        // No output (jaq's `NoOutput`) or gave up.
        _ => Err(Bail),
    }
}

impl Node {
    fn run<'a>(&'a self, x: V<'a>, out: Out<'_, 'a>) -> Result<(), Stop> {
        match self {
            Node::Id => out(x),
            Node::Null => out(V::Null),
            Node::Bool(b) => out(V::Bool(*b)),
            Node::Int(i) => out(V::Int(*i)),
            Node::Str(s) => out(V::Str(S::B(s))),
            Node::Path(base, steps) => base.run(x, &mut |y| path(steps, y, out)),
            Node::Arr(None) => out(V::Arr(Rc::default())),
            Node::Arr(Some(f)) => {
                let mut items = Vec::new();
                f.run(x, &mut |y| {
                    items.push(y);
                    Ok(())
                })
                .map_err(inner)?;
                out(V::Arr(Rc::new(items)))
            }
            Node::Obj(entries) => {
                let mut fields: Vec<(S<'a>, V<'a>)> = Vec::with_capacity(entries.len());
                for (k, f) in entries {
                    insert(&mut fields, S::B(k), single(f, x.clone())?)?;
                }
                out(V::Obj(Rc::new(fields)))
            }
            Node::Pipe(f, g) => f.run(x, &mut |y| g.run(y, out)),
            Node::Comma(f, g) => {
                f.run(x.clone(), out)?;
                g.run(x, out)
            }
            Node::Math(l, op, r) => {
                let (a, b) = (single(l, x.clone())?, single(r, x)?);
                out(math(*op, a, b)?)
            }
            Node::Add => {
                let mut acc = V::Null;
                match x {
                    V::Arr(a) => {
                        for v in a.iter() {
                            acc = math(Op::Add, acc, v.clone())?;
                        }
                    }
                    V::Obj(o) => {
                        for (_, v) in o.iter() {
                            acc = math(Op::Add, acc, v.clone())?;
                        }
                    }
                    _ => return Err(Stop::Bail),
                }
                out(acc)
            }
            Node::Map(f) => {
                let mut items = Vec::new();
                let mut each = |v: &V<'a>| {
                    f.run(v.clone(), &mut |y| {
                        items.push(y);
                        Ok(())
                    })
                    .map_err(inner)
                };
                match &x {
                    V::Arr(a) => a.iter().try_for_each(&mut each)?,
                    V::Obj(o) => o.iter().try_for_each(|(_, v)| each(v))?,
                    _ => return Err(Stop::Bail),
                }
                out(V::Arr(Rc::new(items)))
            }
            Node::Empty => Ok(()),
            Node::Alt(l, r) => {
                let mut any = false;
                l.run(x.clone(), &mut |v| {
                    if truthy(&v) {
                        any = true;
                        out(v)
                    } else {
                        Ok(())
                    }
                })?;
                if any {
                    Ok(())
                } else {
                    r.run(x, out)
                }
            }
            Node::Logic(l, stop, r) => l.run(x.clone(), &mut |a| {
                if truthy(&a) == *stop {
                    out(V::Bool(*stop))
                } else {
                    r.run(x.clone(), &mut |b| out(V::Bool(truthy(&b))))
                }
            }),
            Node::Cmp(l, op, r) => l.run(x.clone(), &mut |a| {
                r.run(x.clone(), &mut |b| out(V::Bool(compare(*op, &a, &b))))
            }),
            Node::Ite(c, t, e) => c.run(x.clone(), &mut |v| {
                let branch = if truthy(&v) { t } else { e };
                branch.run(x.clone(), out)
            }),
            Node::Not => out(V::Bool(!truthy(&x))),
            _ => builtin(self, x, out),
        }
    }
}

/// The builtins of one value that return one value, and `join`, `del`, interpolation.
fn builtin<'a>(node: &'a Node, x: V<'a>, out: Out<'_, 'a>) -> Result<(), Stop> {
    let v = match (node, x) {
        (Node::Length, x) => length(&x)?,
        (Node::Keys(sorted), V::Obj(o)) => {
            let mut keys: Vec<S<'a>> = o.iter().map(|(k, _)| k.clone()).collect();
            if *sorted {
                keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            }
            V::Arr(Rc::new(keys.into_iter().map(V::Str).collect()))
        }
        (Node::Keys(_), V::Arr(a)) => V::Arr(Rc::new(index_values(a.len())?)),
        (Node::Has(k), x) => {
            let k = single(k, x.clone())?;
            V::Bool(match (&x, &k) {
                (V::Null, _) => false,
                (V::Obj(o), V::Str(k)) => o.iter().any(|(key, _)| key.as_str() == k.as_str()),
                // jaq looks the number up among the keys: never there.
                (V::Obj(_), _) => false,
                (V::Arr(a), V::Int(i)) => abs_index(*i, a.len()).is_some(),
                _ => return Err(Stop::Bail),
            })
        }
        (Node::ToEntries, V::Obj(o)) => V::Arr(Rc::new(
            o.iter()
                .map(|(k, v)| entry(V::Str(k.clone()), v.clone()))
                .collect(),
        )),
        (Node::ToEntries, V::Arr(a)) => V::Arr(Rc::new(
            index_values(a.len())?
                .into_iter()
                .zip(a.iter())
                .map(|(k, v)| entry(k, v.clone()))
                .collect(),
        )),
        (Node::FromEntries, x) => from_entries(&x)?,
        (Node::Type, x) => V::Str(S::B(match x {
            V::Null => "null",
            V::Bool(_) => "boolean",
            V::Int(_) | V::Float(_) => "number",
            V::Str(_) => "string",
            V::Arr(_) => "array",
            V::Obj(_) => "object",
        })),
        (Node::Join(sep), V::Arr(a)) => {
            let sep = single(sep, V::Arr(a.clone()))?;
            let V::Str(sep) = sep else {
                return Err(Stop::Bail);
            };
            let mut s = String::new();
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    s.push_str(sep.as_str());
                }
                text(&mut s, v)?;
            }
            V::Str(S::O(Rc::from(s)))
        }
        (Node::Del(keys), x) => del(x, keys)?,
        (Node::Interp(pieces), x) => {
            let mut s = String::new();
            for p in pieces {
                match p {
                    Piece::Lit(l) => s.push_str(l),
                    Piece::Term(f) => text(&mut s, &single(f, x.clone())?)?,
                }
            }
            V::Str(S::O(Rc::from(s)))
        }
        _ => return Err(Stop::Bail),
    };
    out(v)
}

/// jq's truth: everything but `null` and `false`.
fn truthy(v: &V) -> bool {
    !matches!(v, V::Null | V::Bool(false))
}

/// `{"key": k, "value": v}`.
fn entry<'a>(k: V<'a>, v: V<'a>) -> V<'a> {
    V::Obj(Rc::new(vec![(S::B("key"), k), (S::B("value"), v)]))
}

/// `[0, 1, ..., n - 1]`.
fn index_values<'a>(n: usize) -> Result<Vec<V<'a>>, Bail> {
    (0..n)
        .map(|i| i64::try_from(i).map(V::Int).map_err(|_| Bail))
        .collect()
}

/// jaq's `abs_index`: a negative index counts from the end; out of range, none.
fn abs_index(i: i64, len: usize) -> Option<usize> {
    let i = if i < 0 {
        len.checked_sub(usize::try_from(i.checked_neg()?).ok()?)?
    } else {
        usize::try_from(i).ok()?
    };
    (i < len).then_some(i)
}

/// jaq's `length`: `null` 0, a number's absolute value, a string's characters.
fn length<'a>(x: &V<'a>) -> Result<V<'a>, Bail> {
    let n = match x {
        V::Null => 0,
        V::Int(i) => return i.checked_abs().map(V::Int).ok_or(Bail),
        V::Float(f) => return Ok(V::Float(f.abs())),
        V::Str(s) => s.as_str().chars().count(),
        V::Arr(a) => a.len(),
        V::Obj(o) => o.len(),
        V::Bool(_) => return Err(Bail),
    };
    i64::try_from(n).map(V::Int).map_err(|_| Bail)
}

/// jaq's `from_entries`: `reduce (.[] | {(.key): .value}) as $x ({}; . + $x)`, for entries
/// that are objects with a string `key` (anything else is an error jaq tells).
fn from_entries<'a>(x: &V<'a>) -> Result<V<'a>, Bail> {
    let each = |e: &V<'a>, fields: &mut Vec<(S<'a>, V<'a>)>| {
        let V::Obj(e) = e else { return Err(Bail) };
        let find = |name: &str| e.iter().find(|(k, _)| k.as_str() == name).map(|(_, v)| v);
        let Some(V::Str(k)) = find("key") else {
            return Err(Bail);
        };
        insert(fields, k.clone(), find("value").cloned().unwrap_or(V::Null))
    };
    let mut fields = Vec::new();
    match x {
        V::Arr(a) => a.iter().try_for_each(|e| each(e, &mut fields))?,
        V::Obj(o) => o.iter().try_for_each(|(_, e)| each(e, &mut fields))?,
        _ => return Err(Bail),
    }
    Ok(V::Obj(Rc::new(fields)))
}

/// `tostring` of a string, an integer, a boolean or `null` (floats, arrays and objects are
/// printed by jaq's own printer: its case).
fn text(s: &mut String, v: &V) -> Result<(), Bail> {
    match v {
        V::Str(t) => s.push_str(t.as_str()),
        V::Int(i) => s.push_str(itoa::Buffer::new().format(*i)),
        V::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        V::Null => s.push_str("null"),
        _ => return Err(Bail),
    }
    Ok(())
}

/// `del(.a.b)` (jaq's `.a.b |= empty`): the last key removed as `IndexMap::swap_remove`
/// removes it (the last field takes its place); a missing or non-object step on the way is
/// jaq's case.
fn del<'a>(mut x: V<'a>, keys: &[Box<str>]) -> Result<V<'a>, Bail> {
    let Some((last, parents)) = keys.split_last() else {
        return Err(Bail);
    };
    let mut at = &mut x;
    for k in parents {
        let V::Obj(o) = at else { return Err(Bail) };
        at = Rc::make_mut(o)
            .iter_mut()
            .find(|(key, _)| key.as_str() == &**k)
            .map(|(_, v)| v)
            .ok_or(Bail)?;
    }
    let V::Obj(o) = at else { return Err(Bail) };
    if let Some(i) = o.iter().position(|(key, _)| key.as_str() == &**last) {
        Rc::make_mut(o).swap_remove(i);
    }
    Ok(x)
}

/// jaq's `==`, `<`...: `PartialEq` and `Ord` of jaq-json's values.
fn compare(op: Cmp, a: &V, b: &V) -> bool {
    use std::cmp::Ordering::{Greater, Less};
    match op {
        Cmp::Eq => equal(a, b),
        Cmp::Ne => !equal(a, b),
        Cmp::Lt => order(a, b) == Less,
        Cmp::Le => order(a, b) != Greater,
        Cmp::Gt => order(a, b) == Greater,
        Cmp::Ge => order(a, b) != Less,
    }
}

fn equal(a: &V, b: &V) -> bool {
    match (a, b) {
        (V::Null, V::Null) => true,
        (V::Bool(x), V::Bool(y)) => x == y,
        (V::Int(x), V::Int(y)) => x == y,
        (V::Int(i), V::Float(f)) | (V::Float(f), V::Int(i)) => {
            f.is_finite() && float_order(*i as f64, *f) == std::cmp::Ordering::Equal
        }
        (V::Float(x), V::Float(y)) => float_order(*x, *y) == std::cmp::Ordering::Equal,
        (V::Str(x), V::Str(y)) => x.as_str() == y.as_str(),
        (V::Arr(x), V::Arr(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| equal(a, b))
        }
        // `IndexMap`'s equality: the same keys with equal values, in any order.
        (V::Obj(x), V::Obj(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.iter()
                        .find(|(key, _)| key.as_str() == k.as_str())
                        .is_some_and(|(_, w)| equal(v, w))
                })
        }
        _ => false,
    }
}

/// jaq-json's order: `null` < booleans < numbers < strings < arrays < objects; objects by
/// their sorted keys, then their values in that order.
fn order(a: &V, b: &V) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    fn rank(v: &V) -> u8 {
        match v {
            V::Null => 0,
            V::Bool(_) => 1,
            V::Int(_) | V::Float(_) => 2,
            V::Str(_) => 3,
            V::Arr(_) => 4,
            V::Obj(_) => 5,
        }
    }
    match (a, b) {
        (V::Bool(x), V::Bool(y)) => x.cmp(y),
        (V::Int(x), V::Int(y)) => x.cmp(y),
        (V::Int(i), V::Float(f)) => float_order(*i as f64, *f),
        (V::Float(f), V::Int(i)) => float_order(*f, *i as f64),
        (V::Float(x), V::Float(y)) => float_order(*x, *y),
        (V::Str(x), V::Str(y)) => x.as_str().cmp(y.as_str()),
        (V::Arr(x), V::Arr(y)) => {
            for (a, b) in x.iter().zip(y.iter()) {
                match order(a, b) {
                    Ordering::Equal => {}
                    o => return o,
                }
            }
            x.len().cmp(&y.len())
        }
        (V::Obj(x), V::Obj(y)) => {
            let sorted = |o: &Rc<Vec<(S<'_>, V<'_>)>>| {
                let mut l: Vec<usize> = (0..o.len()).collect();
                l.sort_by(|&i, &j| o[i].0.as_str().cmp(o[j].0.as_str()));
                l
            };
            let (l, r) = (sorted(x), sorted(y));
            let keys = l
                .iter()
                .map(|&i| x[i].0.as_str())
                .cmp(r.iter().map(|&i| y[i].0.as_str()));
            keys.then_with(|| {
                for (&i, &j) in l.iter().zip(r.iter()) {
                    match order(&x[i].1, &y[j].1) {
                        Ordering::Equal => {}
                        o => return o,
                    }
                }
                l.len().cmp(&r.len())
            })
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

/// jaq-json's `float_cmp`: zeros equal, NaN below everything, else `total_cmp`.
fn float_order(l: f64, r: f64) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    if l == 0. && r == 0. {
        Ordering::Equal
    } else if l.is_nan() {
        Ordering::Less
    } else if r.is_nan() {
        Ordering::Greater
    } else {
        l.total_cmp(&r)
    }
}

/// Inside `[...]` or a value that must be single, a `Done` cannot come from the consumer.
fn inner(s: Stop) -> Stop {
    match s {
        Stop::Done | Stop::Bail => Stop::Bail,
    }
}

/// The one output of `f`, or [`Bail`] (none, several: jaq's cartesian products decide).
fn single<'a>(f: &'a Node, x: V<'a>) -> Result<V<'a>, Stop> {
    let mut one = None;
    f.run(x, &mut |y| match one {
        Some(_) => Err(Stop::Bail),
        None => {
            one = Some(y);
            Ok(())
        }
    })
    .map_err(inner)?;
    one.ok_or(Stop::Bail)
}

fn path<'a>(steps: &'a [Step], x: V<'a>, out: Out<'_, 'a>) -> Result<(), Stop> {
    let Some((step, rest)) = steps.split_first() else {
        return out(x);
    };
    match (step, x) {
        (Step::Key(_), V::Null) => path(rest, V::Null, out),
        (Step::Key(k), V::Obj(o)) => {
            let v = o.iter().find(|(key, _)| key.as_str() == &**k);
            path(rest, v.map_or(V::Null, |(_, v)| v.clone()), out)
        }
        (Step::Index(_), V::Null) => path(rest, V::Null, out),
        (Step::Index(i), V::Arr(a)) => {
            let v = abs_index(*i, a.len()).map_or(V::Null, |i| a[i].clone());
            path(rest, v, out)
        }
        // jaq looks a number up among an object's keys: never there.
        (Step::Index(_), V::Obj(_)) => path(rest, V::Null, out),
        (Step::Iter, V::Arr(a)) => a.iter().try_for_each(|v| path(rest, v.clone(), out)),
        (Step::Iter, V::Obj(o)) => o.iter().try_for_each(|(_, v)| path(rest, v.clone(), out)),
        // jaq's errors (indexing or iterating a scalar) are jaq's to tell.
        _ => Err(Stop::Bail),
    }
}

/// Insert as jaq's `IndexMap` does: a key already there keeps its place, takes the value.
fn insert<'a>(fields: &mut Vec<(S<'a>, V<'a>)>, k: S<'a>, v: V<'a>) -> Result<(), Bail> {
    if let Some((_, old)) = fields
        .iter_mut()
        .find(|(key, _)| key.as_str() == k.as_str())
    {
        *old = v;
    } else if fields.len() >= MAX_KEYS {
        return Err(Bail);
    } else {
        fields.push((k, v));
    }
    Ok(())
}

/// jaq-json's `+`, `-`, `*` for the cases that need neither big integers nor an error.
fn math<'a>(op: Op, l: V<'a>, r: V<'a>) -> Result<V<'a>, Bail> {
    use V::{Float, Int};
    Ok(match (op, l, r) {
        (Op::Add, V::Null, x) | (Op::Add, x, V::Null) => x,
        (Op::Add, Int(x), Int(y)) => Int(x.checked_add(y).ok_or(Bail)?),
        (Op::Add, Int(i), Float(f)) | (Op::Add, Float(f), Int(i)) => Float(f + i as f64),
        (Op::Add, Float(x), Float(y)) => Float(x + y),
        (Op::Add, V::Str(x), V::Str(y)) => {
            V::Str(S::O(Rc::from([x.as_str(), y.as_str()].concat())))
        }
        (Op::Add, V::Arr(x), V::Arr(y)) => {
            let mut items = Rc::unwrap_or_clone(x);
            items.extend(y.iter().cloned());
            V::Arr(Rc::new(items))
        }
        (Op::Add, V::Obj(x), V::Obj(y)) => {
            let mut fields = Rc::unwrap_or_clone(x);
            for (k, v) in y.iter() {
                insert(&mut fields, k.clone(), v.clone())?;
            }
            V::Obj(Rc::new(fields))
        }
        (Op::Sub, Int(x), Int(y)) => Int(x.checked_sub(y).ok_or(Bail)?),
        (Op::Sub, Float(f), Int(i)) => Float(f - i as f64),
        (Op::Sub, Int(i), Float(f)) => Float(i as f64 - f),
        (Op::Sub, Float(x), Float(y)) => Float(x - y),
        (Op::Mul, Int(x), Int(y)) => Int(x.checked_mul(y).ok_or(Bail)?),
        (Op::Mul, Float(f), Int(i)) | (Op::Mul, Int(i), Float(f)) => Float(f * i as f64),
        (Op::Mul, Float(x), Float(y)) => Float(x * y),
        _ => return Err(Bail),
    })
}

// === field operations, as transform.rs writes them in jq ===

/// `try delpaths([path]) catch .`: the element goes if the whole path is there (an object's
/// key: jaq's `IndexMap::swap_remove`, the last field takes its place; an array's index in
/// bounds), else nothing changes.
fn remove(v: &mut V, path: &[Seg]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = v;
    for seg in parents {
        at = match (at, seg) {
            (V::Obj(o), Seg::Key(k)) => {
                match Rc::make_mut(o)
                    .iter_mut()
                    .find(|(key, _)| key.as_str() == &**k)
                {
                    Some((_, x)) => x,
                    None => return,
                }
            }
            (V::Arr(a), Seg::Index(i)) => match Rc::make_mut(a).get_mut(*i) {
                Some(x) => x,
                None => return,
            },
            _ => return,
        };
    }
    match (at, last) {
        (V::Obj(o), Seg::Key(k)) => {
            if let Some(i) = o.iter().position(|(key, _)| key.as_str() == &**k) {
                Rc::make_mut(o).swap_remove(i);
            }
        }
        (V::Arr(a), Seg::Index(i)) if *i < a.len() => {
            Rc::make_mut(a).remove(*i);
        }
        _ => {}
    }
}

/// `getpath(path)`: `null` for what is missing; jaq's errors are its own.
fn get<'a>(v: &V<'a>, path: &[Seg]) -> Result<V<'a>, Bail> {
    let mut at = v.clone();
    for seg in path {
        at = match (&at, seg) {
            (V::Null, _) | (V::Obj(_), Seg::Index(_)) => V::Null,
            (V::Obj(o), Seg::Key(k)) => o
                .iter()
                .find(|(key, _)| key.as_str() == &**k)
                .map_or(V::Null, |(_, x)| x.clone()),
            (V::Arr(a), Seg::Index(i)) => a.get(*i).cloned().unwrap_or(V::Null),
            _ => return Err(Bail),
        };
    }
    Ok(at)
}

/// `_set(path; x)`: missing objects (arrays, for an index) made on the way, an index equal
/// to an array's length appends; what jaq refuses (or sets with a number key) is its own.
fn set<'a>(at: &mut V<'a>, path: &'a [Seg], x: V<'a>) -> Result<(), Bail> {
    let Some((seg, rest)) = path.split_first() else {
        *at = x;
        return Ok(());
    };
    if matches!(at, V::Null) {
        *at = match seg {
            Seg::Index(_) => V::Arr(Rc::default()),
            Seg::Key(_) => V::Obj(Rc::default()),
        };
    }
    match (at, seg) {
        (V::Arr(a), Seg::Index(i)) => {
            let a = Rc::make_mut(a);
            if *i == a.len() {
                a.push(V::Null);
            }
            set(a.get_mut(*i).ok_or(Bail)?, rest, x)
        }
        (V::Obj(o), Seg::Key(k)) => {
            let o = Rc::make_mut(o);
            let i = match o.iter().position(|(key, _)| key.as_str() == &**k) {
                Some(i) => i,
                None if o.len() >= MAX_KEYS => return Err(Bail),
                None => {
                    o.push((S::B(k), V::Null));
                    o.len() - 1
                }
            };
            set(&mut o[i].1, rest, x)
        }
        _ => Err(Bail),
    }
}

// === read ===

/// serde_json's strict reader into [`V`]: strings without escapes borrowed from the body.
/// The number is the depth of the value's container (0 for the top).
struct Visit(usize);

impl Visit {
    /// A container's elements, one level deeper; past `jq::MAX_DEPTH` levels, an error.
    fn inner<E: de::Error>(&self) -> Result<Seed, E> {
        if self.0 >= super::jq::MAX_DEPTH {
            return Err(E::custom("too deep"));
        }
        Ok(Seed(self.0 + 1))
    }
}

impl<'de> de::Visitor<'de> for Visit {
    type Value = V<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_unit<E>(self) -> Result<V<'de>, E> {
        Ok(V::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<V<'de>, E> {
        Ok(V::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<V<'de>, E> {
        Ok(V::Int(i))
    }
    /// Past `i64::MAX` jaq holds a big integer: its case.
    fn visit_u64<E: de::Error>(self, u: u64) -> Result<V<'de>, E> {
        i64::try_from(u)
            .map(V::Int)
            .map_err(|_| E::custom("big integer"))
    }
    fn visit_f64<E>(self, f: f64) -> Result<V<'de>, E> {
        Ok(V::Float(f))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<V<'de>, E> {
        Ok(V::Str(S::B(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<V<'de>, E> {
        Ok(V::Str(S::O(Rc::from(s))))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<V<'de>, A::Error> {
        let seed = self.inner()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(seed)? {
            items.push(v);
        }
        Ok(V::Arr(Rc::new(items)))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<V<'de>, A::Error> {
        let seed = self.inner()?;
        let mut fields = Vec::new();
        while let Some(k) = map.next_key_seed(Key)? {
            let v = map.next_value_seed(seed)?;
            insert(&mut fields, k, v).map_err(|_| de::Error::custom("too many keys"))?;
        }
        Ok(V::Obj(Rc::new(fields)))
    }
}

#[derive(Clone, Copy)]
struct Seed(usize);

impl<'de> de::DeserializeSeed<'de> for Seed {
    type Value = V<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<V<'de>, D::Error> {
        d.deserialize_any(Visit(self.0))
    }
}

struct Key;

impl<'de> de::DeserializeSeed<'de> for Key {
    type Value = S<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<S<'de>, D::Error> {
        d.deserialize_str(KeyVisit)
    }
}

struct KeyVisit;

impl<'de> de::Visitor<'de> for KeyVisit {
    type Value = S<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<S<'de>, E> {
        Ok(S::B(s))
    }
    fn visit_str<E>(self, s: &str) -> Result<S<'de>, E> {
        Ok(S::O(Rc::from(s)))
    }
}

// === write ===

/// Compact JSON as `jq::write` prints jaq's values (integers in decimal, floats by `ryu`,
/// non-finite ones as `null`, strings escaped by serde_json).
fn write(out: &mut Vec<u8>, v: &V) {
    match v {
        V::Null => out.extend_from_slice(b"null"),
        V::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        V::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        V::Float(f) if !f.is_finite() => out.extend_from_slice(b"null"),
        V::Float(f) => out.extend_from_slice(ryu::Buffer::new().format_finite(*f).as_bytes()),
        V::Str(s) => write_str(out, s.as_str()),
        V::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, item);
            }
            out.push(b']');
        }
        V::Obj(fields) => {
            out.push(b'{');
            for (i, (k, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k.as_str());
                out.push(b':');
                write(out, item);
            }
            out.push(b'}');
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing JSON for a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}
