//! Trace context in HTTP headers: W3C `traceparent` / `tracestate`, and Zipkin's B3, single
//! (`b3`) and multi (`x-b3-*`) forms. Extraction prefers W3C; injection always writes W3C and
//! also rewrites B3 when the request arrived with B3, so an app that only speaks B3 still
//! sees its trace continue.
//!
//! Written here rather than taken from `opentelemetry-zipkin` (the only published B3
//! propagator), which would bring a whole exporter and an HTTP client with it.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Which header family the context came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The remote parent carried by `headers`, if any is present and well formed. A malformed
/// header is ignored (the request starts a new trace), as the W3C spec asks.
pub fn extract(headers: &HeaderMap) -> Option<(SpanContext, Format)> {
    if let Some(sc) = headers.get(TRACEPARENT).and_then(|v| w3c(v, headers)) {
        return Some((sc, Format::W3c));
    }
    if let Some(sc) = headers.get(B3).and_then(b3_single) {
        return Some((sc, Format::B3Single));
    }
    b3_multi(headers).map(|sc| (sc, Format::B3Multi))
}

/// `traceparent` for `sc`, hex-encoded on the stack: this runs on every proxied request, and
/// `format!` through `Display` cost three allocations where one (the value's own) is needed.
fn traceparent(sc: &SpanContext) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // "00-" + 32 hex + "-" + 16 hex + "-" + 2 hex
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let mut put = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            buf[at + 2 * i] = HEX[usize::from(b >> 4)];
            buf[at + 2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    };
    put(3, &sc.trace_id().to_bytes());
    put(36, &sc.span_id().to_bytes());
    put(53, &[sc.trace_flags().to_u8() & 1]);
    // Every byte is an ASCII digit, letter or dash.
    crate::http::headers::shared_value(&buf)
        .unwrap_or_else(|| HeaderValue::from_static("00-0-0-00"))
}

/// Write `sc` as the parent for the next hop (W3C, plus B3 in the form it arrived in).
pub fn inject(headers: &mut HeaderMap, sc: &SpanContext, arrived_as: Option<Format>) {
    let sampled = sc.is_sampled();
    headers.insert(TRACEPARENT, traceparent(sc));
    let state = sc.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(v) if !state.is_empty() => {
            headers.insert(TRACESTATE, v);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
    // B3 is rewritten wherever it is present, not only when the context came in as B3: the
    // previous sidecar added W3C next to the app's B3, and the app at the end reads B3.
    let b3_single = arrived_as == Some(Format::B3Single) || headers.contains_key(B3);
    let b3_multi = arrived_as == Some(Format::B3Multi) || headers.contains_key(B3_TRACE_ID);
    if b3_single {
        {
            let v = format!(
                "{}-{}-{}",
                sc.trace_id(),
                sc.span_id(),
                if sampled { "1" } else { "0" }
            );
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(B3, v);
            }
        }
    }
    if b3_multi {
        {
            let put = |h: &mut HeaderMap, name: HeaderName, v: String| {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(name, v);
                }
            };
            put(headers, B3_TRACE_ID, sc.trace_id().to_string());
            put(headers, B3_SPAN_ID, sc.span_id().to_string());
            headers.remove(B3_PARENT);
            headers.remove(B3_FLAGS);
            headers.insert(
                B3_SAMPLED,
                HeaderValue::from_static(if sampled { "1" } else { "0" }),
            );
        }
    }
}

fn w3c(v: &HeaderValue, headers: &HeaderMap) -> Option<SpanContext> {
    let v = v.to_str().ok()?.trim();
    let mut parts = v.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may append more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = hex_id(trace, TraceId::from_hex)?;
    let span_id = hex_id(span, SpanId::from_hex)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = headers
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    valid(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        state,
    ))
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or just `0` / `d` (a decision only).
fn b3_single(v: &HeaderValue) -> Option<SpanContext> {
    let v = v.to_str().ok()?.trim();
    let mut parts = v.split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = parts.next();
    let trace_id = b3_trace_id(trace)?;
    let span_id = (span.len() == 16).then(|| hex_id(span, SpanId::from_hex))??;
    let sampled = match sampled {
        Some("1") | Some("d") | None => true,
        Some("0") => false,
        Some(_) => return None,
    };
    b3_context(trace_id, span_id, sampled)
}

fn b3_multi(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |n: &HeaderName| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let trace_id = b3_trace_id(get(&B3_TRACE_ID)?)?;
    let span = get(&B3_SPAN_ID)?;
    let span_id = (span.len() == 16).then(|| hex_id(span, SpanId::from_hex))??;
    let sampled =
        get(&B3_FLAGS) == Some("1") || matches!(get(&B3_SAMPLED), Some("1") | Some("true") | None);
    b3_context(trace_id, span_id, sampled)
}

/// A remote parent from B3 (which carries no trace state).
fn b3_context(trace_id: TraceId, span_id: SpanId, sampled: bool) -> Option<SpanContext> {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    valid(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

/// B3 trace ids are 64 or 128 bits; a 64-bit id is left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    match s.len() {
        32 => hex_id(s, TraceId::from_hex),
        16 => hex_id(&format!("{:0>32}", s), TraceId::from_hex),
        _ => None,
    }
}

fn hex_id<T>(s: &str, parse: fn(&str) -> Result<T, std::num::ParseIntError>) -> Option<T> {
    s.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| parse(s).ok())?
}

fn valid(sc: SpanContext) -> Option<SpanContext> {
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn w3c_round_trip_keeps_trace_state() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=abc"),
        ]);
        let (sc, f) = extract(&h).unwrap();
        assert_eq!(f, Format::W3c);
        assert_eq!(sc.trace_id().to_string(), TRACE);
        assert_eq!(sc.span_id().to_string(), SPAN);
        assert!(sc.is_sampled() && sc.is_remote());
        let mut out = HeaderMap::new();
        inject(&mut out, &sc, Some(f));
        assert_eq!(out["traceparent"], format!("00-{TRACE}-{SPAN}-01").as_str());
        assert_eq!(out["tracestate"], "vendor=abc");
    }

    #[test]
    fn traceparent_matches_the_w3c_text_form() {
        for flags in [0u8, 1, 3] {
            let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-{flags:02x}"))]);
            let (sc, _) = extract(&h).unwrap();
            let want = format!("00-{TRACE}-{SPAN}-{:02x}", flags & 1);
            assert_eq!(traceparent(&sc), want.as_str());
        }
    }

    #[test]
    fn malformed_w3c_is_ignored() {
        for bad in [
            format!("00-{TRACE}-{SPAN}"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{}-{SPAN}-01", "g".repeat(32)),
            "garbage".to_string(),
        ] {
            assert!(
                extract(&headers(&[("traceparent", &bad)])).is_none(),
                "{bad}"
            );
        }
        // A future version may carry more fields.
        assert!(extract(&headers(&[(
            "traceparent",
            &format!("01-{TRACE}-{SPAN}-01-xx")
        )]))
        .is_some());
    }

    #[test]
    fn b3_single_and_multi() {
        let (sc, f) = extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-0"))])).unwrap();
        assert_eq!(f, Format::B3Single);
        assert!(!sc.is_sampled());
        let short = "a3ce929d0e0e4736";
        let (sc, f) = extract(&headers(&[
            ("x-b3-traceid", short),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap();
        assert_eq!(f, Format::B3Multi);
        assert_eq!(sc.trace_id().to_string(), format!("{:0>32}", short));
        assert!(sc.is_sampled());
        let mut out = headers(&[("x-b3-parentspanid", SPAN)]);
        inject(&mut out, &sc, Some(f));
        assert_eq!(out["x-b3-spanid"], SPAN);
        assert_eq!(out["x-b3-sampled"], "1");
        assert!(out.get("x-b3-parentspanid").is_none());
        assert!(out.get("traceparent").is_some());
        // W3C wins when both are present.
        let both = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", &format!("{}-{SPAN}-1", "1".repeat(32))),
        ]);
        assert_eq!(extract(&both).unwrap().1, Format::W3c);
    }
}
