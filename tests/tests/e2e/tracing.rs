//! Traces through two sidecars into a real OTLP collector: one trace with the right parent /
//! child links, kinds, attributes and resources; incoming W3C and B3 context honoured and
//! passed on to the app; unsampled context still propagated; a collector that is down costs
//! no request and its drops are counted.

use std::time::Duration;

use http::Request;
use trellis_proxy::config::Config;
use trellis_tests::client::{self, metric};
use trellis_tests::otlp::{Collector, ReceivedSpan, CLIENT, SERVER};
use trellis_tests::{wait_for, Mesh, Pki};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn traced(endpoint: String, sampling: f64) -> impl Fn(&mut Config) {
    move |c: &mut Config| {
        c.tracing.endpoint = Some(endpoint.clone());
        c.tracing.sampling = sampling;
        c.tracing.flush_interval = Duration::from_millis(100);
    }
}

async fn get(mesh: &Mesh, headers: &[(&str, &str)]) -> client::Reply {
    let mut req = Request::get("http://echo/echo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = client::send(
        &client::h1(mesh.client.outbound()),
        req.body(client::empty()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r
}

/// The two spans of `trace`, once both have arrived: (client, server).
async fn two_spans(c: &Collector, trace: &str) -> (ReceivedSpan, ReceivedSpan) {
    wait_for(Duration::from_secs(10), "both spans exported", || async {
        c.trace(trace).len() >= 2
    })
    .await;
    let spans = c.trace(trace);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = spans
        .iter()
        .find(|s| s.kind == CLIENT)
        .expect("client span");
    let server = spans
        .iter()
        .find(|s| s.kind == SERVER)
        .expect("server span");
    (client.clone(), server.clone())
}

fn app_header(r: &client::Reply, name: &str) -> String {
    r.json()["headers"][name].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_two_sidecars_with_w3c_context() {
    let c = Collector::start().await;
    let mesh = Mesh::start_with(traced(c.endpoint(), 0.0), traced(c.endpoint(), 0.0)).await;
    // Sampled by the caller: the parent's decision wins over a sampling ratio of 0.
    let r = get(
        &mesh,
        &[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "app=1"),
        ],
    )
    .await;
    let (client, server) = two_spans(&c, TRACE).await;

    assert_eq!(
        client.parent_span_id, PARENT,
        "client span continues the app's trace"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "server span is the client's child"
    );
    // The app behind the far sidecar sees the server span as its parent, and the trace state.
    assert_eq!(
        app_header(&r, "traceparent"),
        format!("00-{TRACE}-{}-01", server.span_id)
    );
    assert_eq!(app_header(&r, "tracestate"), "app=1");

    assert_eq!(client.service, "client");
    assert_eq!(server.service, "echo");
    assert!(server.resource["service.instance.id"].starts_with("echo-"));
    assert_eq!(
        server.resource["trellis.identity"],
        Pki::spiffe("echo"),
        "{:?}",
        server.resource
    );
    assert_eq!(client.name, "GET");
    for s in [&client, &server] {
        assert_eq!(s.attributes["http.request.method"], "GET");
        assert_eq!(s.attributes["url.path"], "/echo");
        assert_eq!(s.attributes["http.response.status_code"], "200");
        assert_eq!(s.status, 0, "not an error");
    }
    assert_eq!(client.attributes["peer.service"], "echo");
    assert_eq!(client.attributes["http.request.resend_count"], "0");
    assert_eq!(
        client.attributes["network.peer.port"],
        mesh.server.inbound().port().to_string()
    );
    assert_eq!(
        client.attributes["trellis.upstream.identity"],
        Pki::spiffe("echo")
    );
    assert_eq!(
        server.attributes["trellis.peer.identity"],
        Pki::spiffe("client")
    );

    // An error answered by the far side marks both spans (client spans from 4xx).
    let r = client::send(
        &client::h1(mesh.client.outbound()),
        Request::get("http://echo/status/503")
            .header("traceparent", format!("00-{}-{PARENT}-01", "a".repeat(32)))
            .body(client::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    let spans = {
        wait_for(Duration::from_secs(10), "error spans", || async {
            let t = c.trace(&"a".repeat(32));
            t.iter().filter(|s| s.kind == SERVER).count() == 3 && t.iter().any(|s| s.kind == CLIENT)
        })
        .await;
        c.trace(&"a".repeat(32))
    };
    assert!(spans.iter().all(|s| s.status == 2), "{spans:#?}");
    // The caller's sidecar retried the 503 twice (default policy): one client span with the
    // count, one server span per attempt, all children of the client span.
    let client = spans.iter().find(|s| s.kind == CLIENT).unwrap();
    assert!(spans
        .iter()
        .filter(|s| s.kind == SERVER)
        .all(|s| s.parent_span_id == client.span_id));
    assert_eq!(
        client.attributes["http.request.resend_count"], "2",
        "{client:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_context_is_honoured_and_new_traces_start_by_sampling() {
    let c = Collector::start().await;
    let mesh = Mesh::start_with(traced(c.endpoint(), 1.0), traced(c.endpoint(), 1.0)).await;

    // B3 multi-header context from the app.
    let short = "a3ce929d0e0e4736";
    let r = get(
        &mesh,
        &[
            ("x-b3-traceid", short),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let padded = format!("{short:0>32}");
    let (client, server) = two_spans(&c, &padded).await;
    assert_eq!(client.parent_span_id, PARENT);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(app_header(&r, "x-b3-traceid"), padded);
    assert_eq!(app_header(&r, "x-b3-spanid"), server.span_id);
    assert_eq!(app_header(&r, "x-b3-sampled"), "1");

    // B3 single header.
    let single = "5bf92f3577b34da6a3ce929d0e0e4737";
    let r = get(&mesh, &[("b3", &format!("{single}-{PARENT}-1"))]).await;
    let (_, server) = two_spans(&c, single).await;
    assert_eq!(
        app_header(&r, "b3"),
        format!("{single}-{}-1", server.span_id)
    );

    // No context at all, sampling 1: a new trace, rooted at the client span.
    let r = get(&mesh, &[]).await;
    let tp = app_header(&r, "traceparent");
    let trace = tp
        .split('-')
        .nth(1)
        .expect("traceparent reached the app")
        .to_string();
    let (client, server) = two_spans(&c, &trace).await;
    assert_eq!(client.parent_span_id, "", "root span");
    assert_eq!(server.parent_span_id, client.span_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_context_is_propagated_without_spans() {
    let c = Collector::start().await;
    let mesh = Mesh::start_with(traced(c.endpoint(), 1.0), traced(c.endpoint(), 1.0)).await;
    // The caller decided not to sample: parent-based sampling follows, nothing is exported,
    // and the app still receives the same trace id with the flag off.
    let r = get(
        &mesh,
        &[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))],
    )
    .await;
    let tp = app_header(&r, "traceparent");
    assert!(
        tp.starts_with(&format!("00-{TRACE}-")) && tp.ends_with("-00"),
        "{tp}"
    );
    assert_ne!(
        tp,
        format!("00-{TRACE}-{PARENT}-00"),
        "a new parent span id"
    );
    // A sampled request afterwards: once its spans have arrived, the unsampled one's would
    // have too (same sidecars, same queues, in order).
    let sampled = "5bf92f3577b34da6a3ce929d0e0e4737";
    get(
        &mesh,
        &[("traceparent", &format!("00-{sampled}-{PARENT}-01"))],
    )
    .await;
    two_spans(&c, sampled).await;
    assert!(c.trace(TRACE).is_empty());
    assert_eq!(c.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_no_request_and_drops_are_counted() {
    // A port nothing listens on.
    let dead = trellis_tests::ClosedPort::new();
    let endpoint = format!("http://{}", dead.addr);
    let mesh = Mesh::start_with(traced(endpoint.clone(), 1.0), traced(endpoint, 1.0)).await;
    let c = client::h1(mesh.client.outbound());
    for _ in 0..50 {
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    }
    let admin = mesh.client.admin();
    wait_for(Duration::from_secs(10), "drops counted", || async {
        let m = client::admin(admin, "/metrics").await.body;
        metric(
            &m,
            "trellis_trace_spans_dropped_total{reason=\"export_failed\"}",
        ) >= 50.0
    })
    .await;
    let m = client::admin(admin, "/metrics").await.body;
    assert_eq!(metric(&m, "trellis_trace_spans_exported_total"), 0.0);
}
