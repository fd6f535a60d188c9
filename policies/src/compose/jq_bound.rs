//! Bounded evaluation of jaq: whatever the body says, one run of a transform takes at most a
//! budget of steps, builds no value past a size limit, grows the process by at most a memory
//! ceiling and recurses no deeper than its thread's stack allows (issue 22).
//!
//! The threat: the operator writes the program (trusted, but careless), the body is hostile.
//! `.s * .n` with `.n = 1e10` would allocate 10 GB, `[range(.n)]` or `until(.n < 0; ...)` run
//! as long as the body likes, `reduce .p[] as $k (1; {($k): .})` nests values as deep as the
//! body is long. jaq 3 has no fuel or size hook of its own, so the budget is enforced through
//! what it does offer:
//!
//! - **Steps.** jaq clones its evaluation context (`Ctx`) at nearly every step it takes: every
//!   pipe, call, tail call, variable binding, fold iteration and native call. The context holds
//!   our [`DataT`]'s global data ([`Env`]), whose `Clone` counts one step against the run's
//!   [`Budget`] and measures the stack. Past the budget it leaves the run by
//!   [`std::panic::resume_unwind`] (no panic hook runs, nothing is printed): the run is caught
//!   whole by `catch_unwind` in [`run`], and its values (`Rc`s that never leave the run's
//!   thread) are dropped on the way out. The only way out of a loop that calls no native code
//!   and clones no context is through values, which the other bounds cover.
//! - **Sizes.** The operators and builtins that can build a value much larger than their
//!   operands are replaced before compilation: `+` and `*` (and `+=`, `*=`) by natives that
//!   compute the result's size first (`"s" * n`, string and array concatenation, big-integer
//!   products), `range` by one that counts a step per number, `tojson`, `tostring` and string
//!   interpolation by a writer that stops at the limit, `fromjson` by one that refuses nesting
//!   past [`MAX_DEPTH`](super::jq::MAX_DEPTH), `..` by jq's own definition (`recurse`, a step
//!   per value) outside update paths. The rewrite applies to jaq's standard library too (`add`,
//!   `join`, `paths`, `tostring`, ...).
//! - **Memory.** Every 4096 steps the process's resident memory is compared with what it was
//!   when the run started: past the ceiling the run stops. This bounds what the step and size
//!   bounds let accumulate (`[limit(1000; repeat($big | explode))]`).
//! - **Depth.** Every step compares the stack pointer with where the run started; the run has
//!   its own thread with a large stack ([`STACK_BYTES`]), so nested values (whose `Drop`,
//!   comparison and printing recurse) and non-tail recursion fit in it long before the step
//!   budget runs out.
//!
//! Each bound ends the run with a [`Stop`]: the transform fails with a clear error, never
//! half-made, and the sidecar keeps serving (the run is on its own thread).

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use jaq_core::box_iter::{flat_map_with, map_with};
use jaq_core::data::{DataT, HasLut};
use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Def, Pattern, Term};
use jaq_core::native::{bome, v, Filter, Fun};
use jaq_core::ops::Math;
use jaq_core::path::{Part, Path};
use jaq_core::{Cv, Error, Exn, RunPtr, ValR, ValXs};
use jaq_json::{Num, Val};

/// Stack of a thread that runs jaq. Only the pages used are committed. A value takes a step
/// or more per level of nesting, and its drop (also comparison, printing) recurses per level:
/// the deepest a run can build before its memory ceiling stops it (16 MiB bodies: 600 MB,
/// some million levels) is dropped well within this (checked by hand with a 3 million-key
/// body; `deep_recursion_and_deep_values_stop_cleanly` drops 200 000 levels).
pub const STACK_BYTES: usize = 512 * 1024 * 1024;
/// How much of the stack the evaluation itself may use before it stops (the rest is for the
/// recursive drop, comparison and printing of the values it built).
const EVAL_STACK: usize = 256 * 1024 * 1024;
/// Steps per byte of the body limit a run may take by default: a reshape, filter and sort of
/// a 850 kB body (9 000 items) takes 400 000-800 000 steps, a simple reshape half that; jaq
/// runs 15-35 million steps a second on this machine (docs/composition.md).
pub const STEPS_PER_BODY_BYTE: u64 = 4;
/// Fewest and most steps of the default budget (1 MiB body: 4.2 million, about 0.15-0.3 s).
pub const DEFAULT_STEPS: (u64, u64) = (1_000_000, 64 * 1024 * 1024);
/// The largest step budget a policy may set.
pub const MAX_STEPS: u64 = 1_000_000_000;
/// Bytes an `Val` takes in an array (the size estimate of arrays and objects).
const VAL: usize = std::mem::size_of::<Val>();
/// Largest big integer a product may give: jq itself computes in doubles (53 bits); a
/// product of body numbers squared in a loop would otherwise grow without end, and cost
/// quadratic time on the way.
const MAX_INT_BITS: u64 = 4096;
/// How often (in steps) resident memory is read.
const MEMORY_EVERY: u64 = 4096;

/// The bounds of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Steps of jaq's evaluation (context clones, numbers of `range`).
    pub steps: u64,
    /// Largest string, array, object or printed value the program may build, in bytes.
    pub value_bytes: usize,
    /// Largest output, in bytes.
    pub output_bytes: usize,
    /// Largest growth of the process's resident memory during the run, in bytes.
    pub memory_bytes: usize,
}

impl Limits {
    /// The bounds of a transform that buffers bodies of at most `max_body` bytes: values up to
    /// 4 times that (1 MiB at least), output up to that, memory growth 64 MiB plus 32 times
    /// that (jaq's values take 10-20 times the JSON text they are read from).
    pub fn for_body(max_body: u64, steps: u64) -> Self {
        let body = usize::try_from(max_body).unwrap_or(usize::MAX);
        Self {
            steps,
            value_bytes: body.saturating_mul(4).max(1 << 20),
            output_bytes: body,
            memory_bytes: body.saturating_mul(32).saturating_add(64 << 20),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let body = 1 << 20;
        Self::for_body(body, default_steps(body))
    }
}

/// The step budget of a transform of bodies of at most `max_body` bytes, unless the policy
/// sets one.
pub fn default_steps(max_body: u64) -> u64 {
    max_body
        .saturating_mul(STEPS_PER_BODY_BYTE)
        .clamp(DEFAULT_STEPS.0, DEFAULT_STEPS.1)
}

/// Why a run was stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stop {
    #[error("the transform took more than {0} steps")]
    Steps(u64),
    #[error("the transform would build a value of {size} bytes (limit {limit})")]
    Value { size: u64, limit: usize },
    #[error("the transform's output is larger than {0} bytes")]
    Output(usize),
    #[error("the transform used more than {0} bytes of memory")]
    Memory(usize),
    #[error("the transform recursed too deep")]
    Depth,
}

/// What a run has left, shared by every context of the run (through [`Env`]).
pub(super) struct Budget {
    limits: Limits,
    steps: Cell<u64>,
    /// Address of a local of [`run`]: the stack grows down from about there.
    stack_top: usize,
    /// Resident memory when the run started (0: unknown, not checked).
    rss_start: usize,
}

impl Budget {
    fn new(limits: Limits, stack_top: usize) -> Self {
        Self {
            limits,
            steps: Cell::new(limits.steps),
            stack_top,
            rss_start: resident_bytes().unwrap_or(0),
        }
    }

    /// One step: stop when none is left, the stack is used up, or (every
    /// [`MEMORY_EVERY`] steps) memory has grown past the ceiling.
    #[inline]
    fn step(&self) {
        let left = self.steps.get();
        if left == 0 {
            stop(Stop::Steps(self.limits.steps));
        }
        self.steps.set(left - 1);
        let here = stack_address();
        if self.stack_top.saturating_sub(here) > EVAL_STACK {
            stop(Stop::Depth);
        }
        if (self.limits.steps - left) % MEMORY_EVERY == MEMORY_EVERY - 1 {
            self.check_memory();
        }
    }

    #[cold]
    fn check_memory(&self) {
        if self.rss_start == 0 {
            return;
        }
        if let Some(now) = resident_bytes() {
            if now.saturating_sub(self.rss_start) > self.limits.memory_bytes {
                stop(Stop::Memory(self.limits.memory_bytes));
            }
        }
    }

    /// A value of `size` bytes is about to be built.
    fn value(&self, size: u64) {
        if size > self.limits.value_bytes as u64 {
            stop(Stop::Value {
                size,
                limit: self.limits.value_bytes,
            });
        }
    }
}

/// Leave the run (caught in [`run`]); no panic hook runs.
fn stop(why: Stop) -> ! {
    resume_unwind(Box::new(why))
}

/// About where the stack pointer is (the address of a local; no `unsafe`).
#[inline(always)]
fn stack_address() -> usize {
    let marker = 0u8;
    std::hint::black_box(&marker) as *const u8 as usize
}

/// The process's resident memory (Linux: /proc/self/statm, about 2 µs to read; its pages
/// converted to bytes with the page size found once from /proc/self/status's `VmRSS`).
fn resident_bytes() -> Option<usize> {
    static PAGE: OnceLock<Option<usize>> = OnceLock::new();
    let page = (*PAGE.get_or_init(|| {
        let pages = resident_pages()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        // Rounded to a power of two: the two reads are a few pages apart.
        Some((kb * 1024 / pages.max(1)).max(4096).next_power_of_two())
    }))?;
    resident_pages()?.checked_mul(page)
}

fn resident_pages() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

// === jaq's data ===

/// jaq's data kind for bounded runs: values are jaq-json's, the global data carries the
/// run's [`Budget`].
pub struct Bounded;

/// The global data of a bounded run; jaq clones it at every step, which is the step count.
pub struct Env<'a> {
    lut: &'a jaq_core::Lut<Bounded>,
    budget: &'a Budget,
}

impl DataT for Bounded {
    type V<'a> = Val;
    type Data<'a> = Env<'a>;
}

impl Clone for Env<'_> {
    fn clone(&self) -> Self {
        self.budget.step();
        Self {
            lut: self.lut,
            budget: self.budget,
        }
    }
}

impl<'a> HasLut<'a, Bounded> for Env<'a> {
    fn lut(&self) -> &'a jaq_core::Lut<Bounded> {
        self.lut
    }
}

/// Names of the natives the rewrite calls (a leading `_trellis_`, which no jq builtin has).
const ADD: &str = "_trellis_add";
const MUL: &str = "_trellis_mul";
const TOSTRING: &str = "_trellis_tostring";
const UPDATE_VAR: &str = "$__trellis_v";

/// Our natives, to be chained *before* jaq's: the compiler takes the first native of a name
/// and arity, so `range/3`, `tojson` and `fromjson` replace jaq's.
pub(super) fn funs() -> impl Iterator<Item = Fun<Bounded>> {
    natives::<Bounded>().into_iter()
}

/// Generic over the data kind (only [`Bounded`] fits), as jaq-json's natives are: jaq's
/// function pointer types see `Val` only through such a bound.
fn natives<D: for<'a> DataT<V<'a> = Val, Data<'a> = Env<'a>>>() -> Vec<Fun<D>> {
    base::<D>()
        .into_vec()
        .into_iter()
        .map(jaq_core::native::run::<D>)
        .collect()
}

/// Two filter arguments.
fn filters() -> Box<[jaq_core::Bind]> {
    Box::new([jaq_core::Bind::Fun(()), jaq_core::Bind::Fun(())])
}

fn base<D: for<'a> DataT<V<'a> = Val, Data<'a> = Env<'a>>>() -> Box<[Filter<RunPtr<D>>]> {
    Box::new([
        (ADD, filters(), |cv| math(cv, add)),
        (MUL, filters(), |cv| math(cv, mul)),
        (TOSTRING, v(0), |cv| tostring(cv)),
        ("tojson", v(0), |cv| tojson(cv)),
        ("fromjson", v(0), |cv| fromjson(cv)),
        ("range", v(3), |cv| range(cv)),
    ])
}

fn tostring<'a, D: for<'b> DataT<V<'b> = Val, Data<'b> = Env<'b>>>(
    cv: Cv<'a, D>,
) -> ValXs<'a, Val> {
    let b = budget(&cv);
    bome(Ok(match cv.1 {
        s @ Val::TStr(_) => s,
        Val::BStr(s) => Val::TStr(s),
        other => Val::utf8_str(print(b, &other)),
    }))
}

fn tojson<'a, D: for<'b> DataT<V<'b> = Val, Data<'b> = Env<'b>>>(cv: Cv<'a, D>) -> ValXs<'a, Val> {
    let b = budget(&cv);
    bome(Ok(Val::utf8_str(print(b, &cv.1))))
}

fn budget<'a, D: for<'b> DataT<V<'b> = Val, Data<'b> = Env<'b>>>(cv: &Cv<'a, D>) -> &'a Budget {
    cv.0.data().budget
}

/// `_trellis_add(l; r)` and `_trellis_mul(l; r)`: `l + r` and `l * r` as jaq runs them (its
/// `cartesian`: for each output of `l`, each of `r`, lazily; the input cloned for `l` and
/// moved into `r`, so that an accumulator, `reduce ... (.; . + [$x])`, is the only owner of
/// its value and grows in place), the result's size checked first.
fn math<'a, D: for<'b> DataT<V<'b> = Val, Data<'b> = Env<'b>>>(
    cv: Cv<'a, D>,
    op: fn(&Budget, Val, Val) -> ValR<Val>,
) -> ValXs<'a, Val> {
    let (mut ctx, input) = cv;
    let b = ctx.data().budget;
    let (r, rc) = ctx.pop_fun();
    let (l, lc) = ctx.pop_fun();
    let pairs = flat_map_with(
        l.run((lc, input.clone())),
        (rc, input),
        move |x, (rc, input)| map_with(r.run((rc, input)), x, |y, x| (x, y)),
    );
    Box::new(pairs.map(move |(x, y)| Ok(op(b, x?, y?)?)))
}

fn add(b: &Budget, l: Val, r: Val) -> ValR<Val> {
    let size = match (&l, &r) {
        (Val::TStr(x) | Val::BStr(x), Val::TStr(y) | Val::BStr(y)) => (x.len() + y.len()) as u64,
        (Val::Arr(x), Val::Arr(y)) => ((x.len() + y.len()) * VAL) as u64,
        (Val::Obj(x), Val::Obj(y)) => ((x.len() + y.len()) * 2 * VAL) as u64,
        _ => 0,
    };
    b.value(size);
    l + r
}

fn mul(b: &Budget, l: Val, r: Val) -> ValR<Val> {
    let times = |n: &Num| match n {
        Num::Int(i) => u64::try_from(*i).unwrap_or(0),
        Num::BigInt(i) => u64::try_from(&**i).unwrap_or(if i.sign() == num_bigint::Sign::Minus {
            0
        } else {
            u64::MAX
        }),
        _ => 0,
    };
    match (&l, &r) {
        (Val::TStr(s) | Val::BStr(s), Val::Num(n)) | (Val::Num(n), Val::TStr(s) | Val::BStr(s)) => {
            b.value((s.len() as u64).saturating_mul(times(n)));
        }
        (Val::Obj(x), Val::Obj(y)) => b.value(((x.len() + y.len()) * 2 * VAL) as u64),
        (Val::Num(x), Val::Num(y)) => {
            let bits = |n: &Num| match n {
                Num::BigInt(i) => i.bits(),
                _ => 64,
            };
            if matches!(x, Num::BigInt(_)) || matches!(y, Num::BigInt(_)) {
                let product = bits(x) + bits(y);
                if product > MAX_INT_BITS {
                    return Err(Error::str(format_args!(
                        "the product of two integers would have {product} bits (at most {MAX_INT_BITS})"
                    )));
                }
            }
        }
        _ => {}
    }
    l * r
}

/// `range($from; $upto; $by)` as jaq's (jaq-core's `range`, a step per number).
fn range<'a, D: for<'b> DataT<V<'b> = Val, Data<'b> = Env<'b>>>(
    mut cv: Cv<'a, D>,
) -> ValXs<'a, Val> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let b = budget(&cv);
    let by = cv.0.pop_var();
    let to = cv.0.pop_var();
    let from = cv.0.pop_var();
    let cmp = by.partial_cmp(&Val::from(0isize)).unwrap_or(Equal);
    let mut from: ValR<Val> = Ok(from);
    Box::new(std::iter::from_fn(move || match from.clone() {
        Ok(x) => {
            b.step();
            match cmp {
                Greater => x < to,
                Less => x > to,
                Equal => x != to,
            }
            .then(|| std::mem::replace(&mut from, x + by.clone()).map_err(Exn::from))
        }
        Err(e) => {
            from = Ok(to.clone());
            Some(Err(Exn::from(e)))
        }
    }))
}

/// `fromjson` as jaq's, on a string nested at most [`super::jq::MAX_DEPTH`] deep (jaq's reader
/// recurses per level: a body's string of `[`s would overflow the stack).
fn fromjson<'a, D: for<'b> DataT<V<'b> = Val, Data<'b> = Env<'b>>>(
    cv: Cv<'a, D>,
) -> ValXs<'a, Val> {
    let s = match &cv.1 {
        Val::TStr(s) => s.clone(),
        other => return bome(Err(Error::typ(other.clone(), "string"))),
    };
    if super::jq::depth(&s) > super::jq::MAX_DEPTH {
        return bome(Err(Error::str(format_args!(
            "cannot parse as JSON: nested deeper than {} levels",
            super::jq::MAX_DEPTH
        ))));
    }
    let input = cv.1;
    let values: Vec<ValR<Val>> = jaq_json::read::parse_many(&s)
        .map(|r| {
            r.map_err(|e| {
                Error::str(format_args!(
                    "cannot parse {} as JSON: {e}",
                    Clipped(&input)
                ))
            })
        })
        .collect();
    Box::new(values.into_iter().map(|r| r.map_err(Exn::from)))
}

/// `v` as compact JSON (jaq's printer, as `tojson` and string interpolation print), at most
/// the value limit.
fn print(b: &Budget, v: &Val) -> Vec<u8> {
    let mut w = Capped {
        out: Vec::new(),
        limit: b.limits.value_bytes,
    };
    let pp = jaq_json::write::Pp::default();
    if jaq_json::write::write(&mut w, &pp, 0, v).is_err() {
        stop(Stop::Value {
            size: w.out.len() as u64 + 1,
            limit: b.limits.value_bytes,
        });
    }
    w.out
}

/// A writer that fails past `limit` bytes (before allocating them).
struct Capped {
    out: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A value (or error) printed for a message: at most [`CLIP`] bytes, then `...`; printing
/// stops there, however large or deep the value.
pub(super) struct Clipped<'a, T>(pub &'a T);

/// Longest text of a value in an error message.
const CLIP: usize = 200;

impl<T: std::fmt::Display> std::fmt::Display for Clipped<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let mut w = ClipWriter(&mut s);
        let full = std::fmt::Write::write_fmt(&mut w, format_args!("{}", self.0)).is_ok();
        f.write_str(&s)?;
        if !full {
            f.write_str("...")?;
        }
        Ok(())
    }
}

struct ClipWriter<'a>(&'a mut String);

impl std::fmt::Write for ClipWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = CLIP.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push_str(&s[..end]);
        Err(std::fmt::Error)
    }
}

// === the rewrite ===

/// `t` with the operators and builtins that can build large values replaced by bounded
/// natives (see the module's documentation). `lhs`: `t` is (in) the path of an update, where
/// `..` keeps jaq's meaning (leaves first; its updates run a step per value).
pub(super) fn rewrite<'s>(t: Term<&'s str>, lhs: bool) -> Term<&'s str> {
    let rw = |t: Term<&'s str>| rewrite(t, lhs);
    let bx = |t: Box<Term<&'s str>>| Box::new(rewrite(*t, lhs));
    match t {
        Term::Recurse if !lhs => Term::Call("recurse", Vec::new()),
        Term::BinOp(l, BinaryOp::Math(op @ (Math::Add | Math::Mul)), r) => {
            Term::Call(native(op), vec![rw(*l), rw(*r)])
        }
        // `l += r` is `r as $v | l |= . + $v`.
        Term::BinOp(l, BinaryOp::UpdateMath(op @ (Math::Add | Math::Mul)), r) => {
            let update = Term::BinOp(
                Box::new(rewrite(*l, true)),
                BinaryOp::Update,
                Box::new(Term::Call(
                    native(op),
                    vec![Term::Id, Term::Var(UPDATE_VAR)],
                )),
            );
            Term::BinOp(
                bx(r),
                BinaryOp::Pipe(Some(Pattern::Var(UPDATE_VAR))),
                Box::new(update),
            )
        }
        Term::BinOp(l, op, r) => {
            let path = matches!(
                op,
                BinaryOp::Assign | BinaryOp::Update | BinaryOp::UpdateMath(_) | BinaryOp::UpdateAlt
            );
            let op = match op {
                BinaryOp::Pipe(Some(p)) => BinaryOp::Pipe(Some(pattern(p, lhs))),
                op => op,
            };
            Term::BinOp(Box::new(rewrite(*l, lhs || path)), op, bx(r))
        }
        Term::Str(fmt, parts) => {
            let parts = parts
                .into_iter()
                .map(|p| match p {
                    StrPart::Term(t) if fmt.is_none() => StrPart::Term(Term::BinOp(
                        Box::new(rw(t)),
                        BinaryOp::Pipe(None),
                        Box::new(Term::Call(TOSTRING, Vec::new())),
                    )),
                    StrPart::Term(t) => StrPart::Term(rw(t)),
                    p => p,
                })
                .collect();
            Term::Str(fmt, parts)
        }
        Term::Arr(t) => Term::Arr(t.map(bx)),
        Term::Obj(entries) => Term::Obj(
            entries
                .into_iter()
                .map(|(k, v)| (rw(k), v.map(rw)))
                .collect(),
        ),
        Term::Neg(t) => Term::Neg(bx(t)),
        Term::Label(x, t) => Term::Label(x, bx(t)),
        Term::Fold(name, xs, p, args) => Term::Fold(
            name,
            bx(xs),
            pattern(p, lhs),
            args.into_iter().map(rw).collect(),
        ),
        Term::TryCatch(t, c) => Term::TryCatch(bx(t), c.map(bx)),
        Term::IfThenElse(branches, other) => Term::IfThenElse(
            branches.into_iter().map(|(c, t)| (rw(c), rw(t))).collect(),
            other.map(bx),
        ),
        Term::Def(defs, t) => Term::Def(defs.into_iter().map(rewrite_def).collect(), bx(t)),
        Term::Call(name, args) => Term::Call(name, args.into_iter().map(rw).collect()),
        Term::Path(t, path) => Term::Path(
            bx(t),
            Path(
                path.0
                    .into_iter()
                    .map(|(part, opt)| {
                        let part = match part {
                            Part::Index(i) => Part::Index(rw(i)),
                            Part::Range(from, to) => Part::Range(from.map(rw), to.map(rw)),
                        };
                        (part, opt)
                    })
                    .collect(),
            ),
        ),
        t @ (Term::Id | Term::Recurse | Term::Num(_) | Term::Break(_) | Term::Var(_)) => t,
    }
}

/// A definition with its body rewritten.
pub(super) fn rewrite_def(d: Def<&str>) -> Def<&str> {
    Def {
        name: d.name,
        args: d.args,
        body: rewrite(d.body, false),
    }
}

fn pattern(p: Pattern<&str>, lhs: bool) -> Pattern<&str> {
    match p {
        Pattern::Var(x) => Pattern::Var(x),
        Pattern::Arr(ps) => Pattern::Arr(ps.into_iter().map(|p| pattern(p, lhs)).collect()),
        Pattern::Obj(entries) => Pattern::Obj(
            entries
                .into_iter()
                .map(|(k, p)| (rewrite(k, lhs), pattern(p, lhs)))
                .collect(),
        ),
    }
}

fn native(op: Math) -> &'static str {
    match op {
        Math::Mul => MUL,
        _ => ADD,
    }
}

// === running ===

/// Run `filter` on `input` within `limits`: its first output, or why there is none. Must run
/// on a thread with [`STACK_BYTES`] of stack (see [`submit`]).
pub(super) fn run(
    filter: &jaq_core::Filter<Bounded>,
    input: Val,
    limits: Limits,
) -> Result<Val, super::jq::JqError> {
    use super::jq::JqError;
    let budget = Budget::new(limits, stack_address());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let env = Env {
            lut: &filter.lut,
            budget: &budget,
        };
        let ctx = jaq_core::Ctx::<Bounded>::new(env, jaq_core::Vars::new([]));
        let mut out = filter.id.run((ctx, input));
        match out.next() {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(match e.get_err() {
                Ok(e) => JqError::Run(Clipped(&e).to_string()),
                // `halt`, or a `break` past its label: no value.
                Err(_) => JqError::NoOutput,
            }),
            None => Err(JqError::NoOutput),
        }
    }));
    match outcome {
        Ok(r) => r,
        Err(payload) => Err(match payload.downcast::<Stop>() {
            Ok(stop) => JqError::Limit(*stop),
            Err(panic) => {
                let m = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                JqError::Panic(m)
            }
        }),
    }
}

/// A job for a jaq thread; `true`: the thread should end after it (its run hit a bound, and
/// may have touched much of its stack, which a live thread would keep resident).
pub(super) type Job = Box<dyn FnOnce() -> bool + Send>;

/// The threads that run jaq: a few, each with [`STACK_BYTES`] of stack, fed by one queue.
/// Started on first use; a thread whose run hit a bound is replaced by a fresh one.
struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    threads: AtomicUsize,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// How many jaq threads: the cores, 2 to 4. jaq is CPU-bound, so more threads than cores only
/// share them; but two at least, so that one body running up to its budget delays the others'
/// jaq runs by a time slice, not by its whole run.
fn pool_size() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Run `job` on a jaq thread (queued behind the runs before it).
pub(super) fn submit(job: Job) -> std::io::Result<()> {
    let pool = POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        Pool {
            tx: Mutex::new(tx),
            rx: Arc::new(Mutex::new(rx)),
            threads: AtomicUsize::new(0),
        }
    });
    while pool.threads.load(Ordering::Acquire) < pool_size() {
        if let Err(e) = start_thread(pool) {
            // Fewer threads than wanted still run the queue; none cannot.
            if pool.threads.load(Ordering::Acquire) == 0 {
                return Err(e);
            }
            break;
        }
    }
    let tx = pool.tx.lock().unwrap_or_else(|e| e.into_inner());
    tx.send(job)
        .map_err(|_| std::io::Error::other("the jaq threads are gone"))
}

fn start_thread(pool: &'static Pool) -> std::io::Result<()> {
    pool.threads.fetch_add(1, Ordering::AcqRel);
    let rx = Arc::clone(&pool.rx);
    let started = std::thread::Builder::new()
        .name("trellis-jq".into())
        .stack_size(STACK_BYTES)
        .spawn(move || loop {
            let job = {
                let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                rx.recv()
            };
            let Ok(job) = job else {
                break;
            };
            if job() {
                // Replaced by a fresh thread (if none can start, the next submit tries).
                pool.threads.fetch_sub(1, Ordering::AcqRel);
                let _ = start_thread(pool);
                break;
            }
        });
    if let Err(e) = started {
        pool.threads.fetch_sub(1, Ordering::AcqRel);
        return Err(e);
    }
    Ok(())
}

/// Hostile bodies against careless programs: each run ends quickly with the bound it hit,
/// on its own thread, and the process goes on.
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::jq::{compile_jq, JqError};
    use super::*;

    /// Small enough for a debug build to run out of steps in a second or two.
    fn limits() -> Limits {
        Limits::for_body(1 << 20, 2_000_000)
    }

    fn run(code: &str, body: &str) -> (Result<String, JqError>, Duration) {
        let f = compile_jq(code).expect("compiles").with_limits(limits());
        let start = Instant::now();
        let out = f.apply(body.as_bytes());
        let took = start.elapsed();
        (out.map(|b| String::from_utf8(b).expect("utf-8")), took)
    }

    #[track_caller]
    fn stops(code: &str, body: &str, want: fn(&Stop) -> bool) -> Stop {
        let (out, took) = run(code, body);
        let Err(JqError::Limit(stop)) = out else {
            panic!("`{code}` on {body}: {out:?}");
        };
        assert!(want(&stop), "`{code}` on {body}: {stop:?}");
        // A guard against a run that never stops, not a speed target (the test profile is
        // unoptimised and CI machines are shared): the bounds' costs are in docs/composition.md.
        assert!(took < Duration::from_secs(90), "`{code}`: {took:?}");
        stop
    }

    #[test]
    fn strings_repeated_by_a_body_number_are_refused_before_they_are_built() {
        let value = |s: &Stop| matches!(s, Stop::Value { .. });
        let stop = stops(".s * .n", r#"{"s": "abc", "n": 10000000000}"#, value);
        assert_eq!(
            stop,
            Stop::Value {
                size: 30_000_000_000,
                limit: 4 << 20
            }
        );
        // jaq itself panics with `capacity overflow` on this one.
        stops(r#""s" * 9223372036854775807"#, "null", value);
        stops(
            ".n * .s | ascii_downcase",
            r#"{"s": "x", "n": 9223372036854775807}"#,
            value,
        );
        stops(
            r#"reduce range(.n) as $i ("x"; . + .)"#,
            r#"{"n": 64}"#,
            value,
        );
        stops(
            r#"reduce range(.n) as $i ([1]; . + .)"#,
            r#"{"n": 64}"#,
            value,
        );
        // Within the limit, as jaq gives it; non-positive counts give null.
        assert_eq!(
            run(".s * .n", r#"{"s": "ab", "n": 3}"#).0.unwrap(),
            r#""ababab""#
        );
        assert_eq!(run(".s * .n", r#"{"s": "ab", "n": -3}"#).0.unwrap(), "null");
        let (out, _) = run(r#"(.s | tostring) + "\(.n)""#, r#"{"s": "a", "n": [1]}"#);
        assert_eq!(out.unwrap(), r#""a[1]""#);
    }

    #[test]
    fn loops_run_out_of_steps() {
        let steps = |s: &Stop| matches!(s, Stop::Steps(2_000_000) | Stop::Memory(_));
        stops("[range(.n)] | length", r#"{"n": 1e12}"#, steps);
        stops("[limit(.n; repeat(1))] | length", r#"{"n": 1e12}"#, steps);
        stops("last(range(.n))", r#"{"n": 1e12}"#, |s| {
            *s == Stop::Steps(2_000_000)
        });
        stops("until(. < 0; . + 1)", "0", |s| *s == Stop::Steps(2_000_000));
        stops("[.[] | while(true; .)]", "[1]", steps);
        stops("def f: f; f", "0", |s| *s == Stop::Steps(2_000_000));
        stops("def f: . + 1 | f; f", "0", |s| *s == Stop::Steps(2_000_000));
        // `..` over a value that shares itself: 2^60 values, a step each.
        stops(
            "reduce range(.n) as $i (1; [., .]) | [..] | length",
            r#"{"n": 60}"#,
            steps,
        );
        // Within the budget, as jaq gives it.
        assert_eq!(
            run("[range(.n)] | length", r#"{"n": 1000}"#).0.unwrap(),
            "1000"
        );
    }

    #[test]
    fn deep_recursion_and_deep_values_stop_cleanly() {
        // Non-tail recursion: the evaluation's own stack.
        // (The stack's pages count as resident memory: the ceiling may come first.)
        let deep = |s: &Stop| matches!(s, Stop::Depth | Stop::Steps(_) | Stop::Memory(_));
        stops("def f: [f]; f", "0", deep);
        stops("def f: 1 + f; f", "0", deep);
        // A value nested as deep as the body is long: dropped on the run's stack.
        let (out, _) = run(
            r#"reduce .[] as $k (1; {($k): .}) | [getpath(["a", "a"]) | length, (. == .)]"#,
            &format!("[{}]", vec!["\"a\""; 200_000].join(",")),
        );
        assert_eq!(out.unwrap(), "[1,true]");
        stops(
            "reduce range(.n) as $i (0; [.]) | length",
            r#"{"n": 1e9}"#,
            // About 50 bytes a level: the memory ceiling may come first.
            |s| matches!(s, Stop::Steps(_) | Stop::Memory(_)),
        );
        // An output nested past what readers take.
        stops("reduce range(200) as $i (0; [.])", "null", |s| {
            *s == Stop::Depth
        });
        // jaq's JSON reader recurses per level: a body's string of brackets.
        let (out, _) = run(
            ".p | fromjson",
            &format!(r#"{{"p": "{}"}}"#, "[".repeat(100_000)),
        );
        assert!(
            matches!(&out, Err(JqError::Run(m)) if m.contains("nested deeper than 64")),
            "{out:?}"
        );
        assert_eq!(
            run(".p | fromjson", r#"{"p": "[1, {\"a\": 2}]"}"#)
                .0
                .unwrap(),
            r#"[1,{"a":2}]"#
        );
    }

    #[test]
    fn printing_and_output_are_bounded() {
        let value = |s: &Stop| matches!(s, Stop::Value { .. });
        // 2^40 leaves in a few steps of sharing: printed, they would be terabytes.
        stops(
            "reduce range(.n) as $i (1; [., .]) | tojson",
            r#"{"n": 40}"#,
            value,
        );
        stops(
            "reduce range(.n) as $i (1; [., .]) | tostring",
            r#"{"n": 40}"#,
            value,
        );
        stops(
            r#"reduce range(.n) as $i (1; [., .]) | "\(.)""#,
            r#"{"n": 40}"#,
            value,
        );
        stops(
            r#"reduce range(.n) as $i (1; [., .]) | @base64"#,
            r#"{"n": 40}"#,
            value,
        );
        stops("reduce range(.n) as $i (1; [., .])", r#"{"n": 40}"#, |s| {
            *s == Stop::Output(1 << 20)
        });
        // Errors quote values clipped.
        let (out, _) = run("reduce range(.n) as $i (1; [., .]) | .a", r#"{"n": 40}"#);
        let Err(JqError::Run(m)) = out else {
            panic!("{out:?}");
        };
        assert!(m.len() < 300 && m.starts_with("cannot index [[[["), "{m}");
    }

    #[test]
    fn memory_that_accumulates_is_bounded() {
        // Each value under the size limit, many of them kept: resident memory grows past
        // the ceiling (96 MiB here) long before the steps run out.
        let body = format!(r#"{{"s": "{}"}}"#, "x".repeat(1 << 18));
        let stop = stops(
            "[limit(100000; repeat(.s | explode))] | length",
            &body,
            |_| true,
        );
        assert_eq!(stop, Stop::Memory(96 << 20));
    }

    #[test]
    fn halt_ends_the_run_not_the_process() {
        assert_eq!(run("halt", "1").0, Err(JqError::NoOutput));
        assert_eq!(run("1, halt", "1").0.unwrap(), "1");
        assert_eq!(run("halt(3)", "1").0, Err(JqError::NoOutput));
        // `halt_error` writes to the sidecar's log: refused at compile time (jq.rs, REFUSED).
        assert!(compile_jq("1, halt_error").is_err());
    }

    #[test]
    fn products_of_big_integers_are_bounded() {
        let (out, _) = run(
            "reduce range(20) as $i (.n; . * .)",
            r#"{"n": 4611686018427387904}"#,
        );
        assert!(
            matches!(&out, Err(JqError::Run(m)) if m.contains("at most 4096")),
            "{out:?}"
        );
    }
}
