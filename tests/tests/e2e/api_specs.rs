//! `mesh-agent api put|list|get|diff|delete|gc` against a real etcd (issue 19, "specs in the mesh"): two
//! versions of a service's OpenAPI document stored once per content hash, listed, read back
//! and diffed with the breaking changes flagged; `ApiSpec` documents through `policy apply`;
//! invalid and oversized documents refused with the reason; a document near the stored limit
//! accepted by etcd's default request limit; and garbage written straight into etcd answered
//! with an error naming the key, not a panic. And the sidecar's own fetch of the app's
//! document (`api_spec:`): listed once the app serves it, an invalid one logged and the last
//! good kept, a new version listed too.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use etcd_client::{Client, GetOptions};
use mesh_agent::api::{self, ApiError, MAX_STORED_BYTES};
use mesh_agent::cli::{Cli, Command};
use mesh_agent::testing::EtcdCluster;
use serde_json::{json, Value};
use trellis_policies::parse_documents;
use trellis_tests::init_logs;

/// Parse a command line as `mesh-agent` does and run it; returns what it would print.
async fn run(endpoint: &str, args: &[&str]) -> Result<String, ApiError> {
    let argv = ["mesh-agent", "api"]
        .iter()
        .chain(args)
        .copied()
        .chain(["--etcd-endpoints", endpoint]);
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Command::Api { command } = cli.command else {
        unreachable!()
    };
    api::execute(command).await
}

fn v1() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Orders API", "version": "1.0.0"},
        "paths": {
            "/orders": {"get": {
                "parameters": [{"name": "limit", "in": "query"}],
                "responses": {"200": {"description": "ok", "content": {"application/json": {
                    "schema": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}}}}}}}},
            "/orders/{id}": {"delete": {"responses": {"204": {"description": "deleted"}}}}
        },
        "components": {"schemas": {"Order": {"type": "object", "properties": {
            "id": {"type": "string"}, "total": {"type": "number"}, "note": {"type": "string"}}}}}
    })
}

fn v2() -> Value {
    let mut d = v1();
    d["info"]["version"] = json!("2.0.0");
    d["paths"]["/orders/{id}"] = json!({"get": {"responses": {"200": {"description": "ok"}}}});
    d["paths"]["/orders"]["get"]["parameters"] =
        json!([{"name": "tenant", "in": "query", "required": true}]);
    d["components"]["schemas"]["Order"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("note");
    d
}

/// An `ApiSpec` document carrying `doc` inline, as YAML.
fn api_spec_yaml(name: &str, version: &str, doc: &Value) -> String {
    let doc = json!({"apiVersion": "trellis.dev/v1", "kind": "ApiSpec",
        "metadata": {"name": name},
        "spec": {"service": "orders", "version": version, "document": doc}});
    serde_norway::to_string(&doc).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

async fn count(c: &mut Client, prefix: &str) -> usize {
    let opts = GetOptions::new().with_prefix().with_keys_only();
    c.get(prefix, Some(opts)).await.unwrap().kvs().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_are_stored_once_per_hash_listed_read_and_diffed() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();

    // v1 as an ApiSpec document, v2 as a bare OpenAPI JSON file, and v1 again under another
    // version (an unchanged API): its document is not written a second time.
    let f1 = write(
        dir.path(),
        "v1.yaml",
        &api_spec_yaml("orders-v1", "v1", &v1()),
    );
    let out = run(&ep, &["put", &f1]).await.unwrap();
    assert!(out.starts_with("orders v1: stored sha256:"), "{out}");
    let f2 = write(dir.path(), "openapi.json", &v2().to_string());
    let out = run(&ep, &["put", &f2, "--service", "orders", "--version", "v2"])
        .await
        .unwrap();
    assert!(out.starts_with("orders v2: stored"), "{out}");
    let f3 = write(
        dir.path(),
        "v1b.yaml",
        &api_spec_yaml("orders-v1b", "v1-b", &v1()),
    );
    let out = run(&ep, &["put", &f3]).await.unwrap();
    assert!(out.contains("indexed (document already stored)"), "{out}");
    assert_eq!(count(&mut c, "/trellis/v1/apis/specs/").await, 2);
    assert_eq!(count(&mut c, "/trellis/v1/apis/index/").await, 3);

    // list, as a table and as JSON.
    let table = run(&ep, &["list"]).await.unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("SERVICE"), "{table}");
    assert!(
        lines[1].starts_with("orders")
            && lines[1].contains(" v1 ")
            && lines[1].ends_with("Orders API"),
        "{table}"
    );
    let rows: Value =
        serde_json::from_str(&run(&ep, &["list", "-o", "json"]).await.unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    let versions: Vec<&str> = rows
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["v1", "v1-b", "v2"]);
    assert_eq!(rows[0]["sha256"], rows[1]["sha256"]);
    assert_ne!(rows[0]["sha256"], rows[2]["sha256"]);
    assert_eq!(rows[2]["info_version"], "2.0.0");

    // get: the document as stored; without --version, the one written last.
    let got: Value = serde_json::from_str(
        &run(&ep, &["get", "orders", "--version", "v2"])
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(got, v2());
    let latest: Value = serde_json::from_str(&run(&ep, &["get", "orders"]).await.unwrap()).unwrap();
    assert_eq!(latest, v1(), "v1-b was written last");
    let e = run(&ep, &["get", "billing"]).await.unwrap_err().to_string();
    assert!(e.contains("no API spec stored for billing"), "{e}");

    // diff, with the breaking changes flagged.
    let table = run(&ep, &["diff", "orders", "v1", "v2"]).await.unwrap();
    assert!(
        table.starts_with("orders v1 -> v2: 4 change(s), 3 breaking"),
        "{table}"
    );
    for want in [
        "yes       method removed             DELETE /orders/{id}",
        "yes       response field removed     GET /orders                  200 response field `[].note` removed",
        "yes       required parameter added   GET /orders                  new required query parameter `tenant`",
        "no        method added               GET /orders/{id}",
    ] {
        assert!(table.contains(want), "missing `{want}` in\n{table}");
    }
    let j: Value = serde_json::from_str(
        &run(&ep, &["diff", "orders", "v1", "v2", "-o", "json"])
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(j["breaking"], 3);
    assert_eq!(j["changes"][0]["kind"], "method_removed");
    let same = run(&ep, &["diff", "orders", "v1", "v1-b"]).await.unwrap();
    assert_eq!(same, "orders v1 -> v1-b: 0 change(s), 0 breaking\n");

    // `policy apply` hands ApiSpec documents to the same store; none lands under the policies.
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    let docs: Vec<_> = parse_documents(&api_spec_yaml("orders-v3", "v3", &v2()), "t")
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    let report = mesh_agent::policy::apply_as(&cfg, &docs, false, "alice")
        .await
        .unwrap();
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(
        report[0].starts_with("orders v3: indexed (document already stored)"),
        "{report:?}"
    );
    assert_eq!(count(&mut c, "/trellis/v1/mesh/policies/").await, 0);
}

/// `orders` (as [`v1`]) and an internal `billing` stored at version v1.
/// `api delete` and `api gc`: a version's index entry goes, and its document only once no
/// other version names it; a version an HTTPRoute validates with is kept unless forced; a
/// document left without any version (written straight into etcd here) is collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_deleted_and_documents_no_version_names_collected() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    // v1 and v1-b share one document; v2 has its own.
    for (version, doc) in [("v1", v1()), ("v1-b", v1()), ("v2", v2())] {
        let f = write(dir.path(), &format!("{version}.json"), &doc.to_string());
        run(
            &ep,
            &["put", &f, "--service", "orders", "--version", version],
        )
        .await
        .unwrap();
    }
    assert_eq!(count(&mut c, "/trellis/v1/apis/specs/").await, 2);

    // The shared document stays while v1-b names it.
    let out = run(&ep, &["delete", "orders", "--version", "v1"])
        .await
        .unwrap();
    assert_eq!(out, "orders v1: deleted\n");
    assert_eq!(count(&mut c, "/trellis/v1/apis/specs/").await, 2);
    let e = run(&ep, &["get", "orders", "--version", "v1"])
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)), "{e}");
    assert!(run(&ep, &["get", "orders", "--version", "v1-b"])
        .await
        .is_ok());

    // A version validation uses is refused, naming the route; --force deletes it.
    let route = "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: shop}\nspec:\n  hosts: [api.example.com]\n  gateways: [edge]\n  rules:\n  - backends: [{service: orders}]\n    validation: {spec: {service: orders, version: v1-b}}\n";
    apply(&etcd, route).await;
    let e = run(&ep, &["delete", "orders", "--version", "v1-b"])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("validation at the edge uses it: HTTPRoute/shop rules[0] (orders v1-b)"),
        "{e}"
    );
    assert_eq!(count(&mut c, "/trellis/v1/apis/index/").await, 2);
    let out = run(&ep, &["delete", "orders", "--version", "v1-b", "--force"])
        .await
        .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "orders v1-b: deleted", "{out}");
    assert!(
        lines[1].starts_with("document sha256:")
            && lines[1].ends_with("deleted (no version names it)"),
        "{out}"
    );
    assert_eq!(count(&mut c, "/trellis/v1/apis/specs/").await, 1);
    let listed = run(&ep, &["list"]).await.unwrap();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(listed.contains(" v2 "), "{listed}");

    // Unknown versions and services are errors, not silent successes.
    let e = run(&ep, &["delete", "orders", "--version", "v9"])
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)), "{e}");
    let e = run(&ep, &["delete", "billing", "--all"]).await.unwrap_err();
    assert!(matches!(e, ApiError::NotFound(_)), "{e}");

    // gc: a stray document no version names is listed by a dry run, then deleted; v2's stays.
    c.put("/trellis/v1/apis/specs/00ff", "stray", None)
        .await
        .unwrap();
    let out = run(&ep, &["gc", "--dry-run"]).await.unwrap();
    assert_eq!(out, "document sha256:00ff: would be deleted\n");
    assert_eq!(count(&mut c, "/trellis/v1/apis/specs/").await, 2);
    let out = run(&ep, &["gc"]).await.unwrap();
    assert_eq!(out, "document sha256:00ff: deleted (no version names it)\n");
    assert_eq!(
        run(&ep, &["gc"]).await.unwrap(),
        "no unreferenced documents\n"
    );
    assert!(run(&ep, &["get", "orders", "--version", "v2"])
        .await
        .is_ok());

    // --all: every version of the service, then its documents.
    let out = run(&ep, &["delete", "orders", "--all"]).await.unwrap();
    assert!(
        out.starts_with("orders v2: deleted\ndocument sha256:"),
        "{out}"
    );
    assert_eq!(count(&mut c, "/trellis/v1/apis/specs/").await, 0);
    assert_eq!(count(&mut c, "/trellis/v1/apis/index/").await, 0);
}

async fn store_orders_and_billing(ep: &str) {
    let dir = tempfile::tempdir().unwrap();
    let billing = json!({"openapi": "3.1.0", "info": {"title": "Billing", "version": "1"},
        "paths": {"/invoices": {"get": {"responses": {"200": {"description": "ok"}}}}}});
    for (service, doc) in [("orders", v1()), ("billing", billing)] {
        let f = write(dir.path(), &format!("{service}.json"), &doc.to_string());
        run(ep, &["put", &f, "--service", service, "--version", "v1"])
            .await
            .unwrap();
    }
}

/// Apply policy documents (YAML) as `policy apply` does; the etcd configuration.
async fn apply(etcd: &EtcdCluster, yaml: &str) -> mesh_agent::config::EtcdConfig {
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    let docs: Vec<_> = parse_documents(yaml, "t")
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    mesh_agent::policy::apply_as(&cfg, &docs, false, "alice")
        .await
        .unwrap();
    cfg
}

/// `api public`: the gateway's view through its routes. `orders` is reached through a prefix
/// rewrite, `billing` only inside the mesh; the gateway's API-key policy becomes a security
/// scheme; a garbage policy value in etcd is named and left out, not fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_view_maps_paths_through_the_gateway_routes() {
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoints()[0].clone();
    store_orders_and_billing(&ep).await;
    let policies = "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: shop}\nspec:\n  hosts: [api.example.com]\n  gateways: [edge]\n  rules:\n  - matches: [{path: {prefix: /shop}}]\n    rewrite: {path_prefix: /orders}\n    backends: [{service: orders}]\n---\napiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: internal}\nspec:\n  hosts: [billing]\n  rules:\n  - backends: [{service: billing}]\n---\napiVersion: trellis.dev/v1\nkind: AuthenticationPolicy\nmetadata: {name: edge-keys}\nspec:\n  service: edge\n  api_keys: {header: x-api-key}\n";
    let cfg = apply(&etcd, policies).await;
    let mut c = Client::connect([ep.as_str()], None).await.unwrap();
    c.put(
        "/trellis/v1/mesh/policies/HTTPRoute/garbage",
        "{not json",
        None,
    )
    .await
    .unwrap();

    let out = run(
        &ep,
        &[
            "public",
            "--gateway",
            "edge",
            "--public-url",
            "https://api.example.com",
        ],
    )
    .await
    .unwrap();
    let doc: Value = serde_json::from_str(&out).unwrap();
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert_eq!(paths, ["/shop", "/shop/{id}"], "{doc:#}");
    assert_eq!(doc["servers"][0]["url"], "https://api.example.com");
    assert_eq!(
        doc["components"]["securitySchemes"]["apiKey"],
        json!({"type": "apiKey", "in": "header", "name": "x-api-key"})
    );
    assert_eq!(
        doc["paths"]["/shop"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            ["items"]["$ref"],
        "#/components/schemas/orders.Order"
    );
    trellis_policies::validate_openapi(&doc).expect("the combined document is valid OpenAPI");

    let req = mesh_agent::api_public::Request {
        gateway: "edge",
        public_url: None,
        service: Some("orders"),
        title: "t",
    };
    let (one, notes) = mesh_agent::api_public::public(&cfg, &req).await.unwrap();
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["info"]["title"], "Orders API");
    assert_eq!(one["servers"][0]["url"], "https://api.example.com");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("HTTPRoute/garbage"), "{notes:?}");

    let internal = run(
        &ep,
        &["public", "--gateway", "edge", "--service", "billing"],
    )
    .await;
    assert!(
        matches!(&internal, Err(ApiError::NotPublic(s, g)) if s == "billing" && g == "edge"),
        "{internal:?}"
    );
    let unknown = run(&ep, &["public", "--gateway", "edge", "--service", "nosuch"]).await;
    assert!(matches!(unknown, Err(ApiError::NotFound(_))), "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_oversized_and_garbage_specs_give_clear_errors() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();

    // A $ref cycle, refused with its JSON path and the cycle; nothing written.
    let mut cyclic = v1();
    cyclic["components"]["schemas"]["Order"] = json!({"$ref": "#/components/schemas/Alias"});
    cyclic["components"]["schemas"]["Alias"] = json!({"$ref": "#/components/schemas/Order"});
    let f = write(
        dir.path(),
        "cyclic.yaml",
        &api_spec_yaml("orders-bad", "v9", &cyclic),
    );
    let e = run(&ep, &["put", &f]).await.unwrap_err().to_string();
    assert!(e.contains("ApiSpec/orders-bad: spec.document: $.components.schemas.Alias.$ref: $ref cycle: #/components/schemas/Order -> #/components/schemas/Alias -> #/components/schemas/Order"), "{e}");
    assert_eq!(count(&mut c, "/trellis/v1/apis/").await, 0);

    // A 50 MB file is refused by its size, before it is read (a sparse file: no disk used).
    let big = dir.path().join("huge.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(50 << 20)
        .unwrap();
    let t = Instant::now();
    let big = big.display().to_string();
    let e = run(
        &ep,
        &["put", &big, "--service", "orders", "--version", "v9"],
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(
        e.contains("is 52428800 bytes, over the limit of 8454144 bytes"),
        "{e}"
    );

    // Around the stored limit: hex noise gzips to ~57 % of its size. 1.85 MB of it compresses
    // past 1 MiB and is refused with the limit named; 1.75 MB lands just under it, and etcd
    // takes it with its default request limit (1.5 MiB).
    let noisy = |n: usize| {
        let mut noise = String::new();
        let mut h = ring::digest::digest(&ring::digest::SHA256, b"seed");
        while noise.len() < n {
            h = ring::digest::digest(&ring::digest::SHA256, h.as_ref());
            noise.extend(h.as_ref().iter().map(|b| format!("{b:02x}")));
        }
        let mut doc = v1();
        doc["info"]["description"] = json!(noise);
        doc
    };
    let f = write(dir.path(), "over.json", &noisy(1_850_000).to_string());
    let e = run(
        &ep,
        &["put", &f, "--service", "orders", "--version", "over"],
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("over the limit of 1048576 bytes stored per document (etcd refuses requests over 1.5 MiB by default); nothing was written"),
        "{e}"
    );
    assert_eq!(count(&mut c, "/trellis/v1/apis/").await, 0);
    let large = noisy(1_750_000);
    let f = write(dir.path(), "large.json", &large.to_string());
    let out = run(
        &ep,
        &["put", &f, "--service", "orders", "--version", "large"],
    )
    .await
    .unwrap();
    let rows: Value =
        serde_json::from_str(&run(&ep, &["list", "-o", "json"]).await.unwrap()).unwrap();
    let stored = rows[0]["stored"].as_u64().unwrap() as usize;
    assert!(stored > 900_000 && stored <= MAX_STORED_BYTES, "{out}");
    let back: Value = serde_json::from_str(
        &run(&ep, &["get", "orders", "--version", "large"])
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(back, large);

    // Garbage written into etcd by hand: an index entry that is not JSON ...
    c.put("/trellis/v1/apis/index/orders/junk", "\u{0}not json", None)
        .await
        .unwrap();
    let e = run(&ep, &["get", "orders", "--version", "junk"])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("etcd key /trellis/v1/apis/index/orders/junk: not an API index entry"),
        "{e}"
    );
    let e = run(&ep, &["list"]).await.unwrap_err().to_string();
    assert!(
        e.starts_with("etcd key /trellis/v1/apis/index/orders/junk"),
        "{e}"
    );
    c.delete("/trellis/v1/apis/index/orders/junk", None)
        .await
        .unwrap();

    // ... a document that is not gzip, and one whose content is not what its key says.
    let hash = rows[0]["sha256"].as_str().unwrap().to_string();
    let blob_key = format!("/trellis/v1/apis/specs/{hash}");
    c.put(blob_key.as_str(), "garbage", None).await.unwrap();
    let e = run(&ep, &["get", "orders", "--version", "large"])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "etcd key {blob_key}: not a gzip-compressed document"
        )),
        "{e}"
    );
    let mut gz = flate2_gzip(b"{\"openapi\": \"3.1.0\"}");
    c.put(blob_key.as_str(), std::mem::take(&mut gz), None)
        .await
        .unwrap();
    let e = run(&ep, &["diff", "orders", "large", "large"])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("content hash is") && e.contains("not the key's"),
        "{e}"
    );
    c.delete(blob_key.as_str(), None).await.unwrap();
    let e = run(&ep, &["get", "orders", "--version", "large"])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing, though orders large names it"), "{e}");
}

/// A valid gzip stream of `bytes` (the header of RFC 1952 and a stored deflate block), so
/// that this crate needs no compression dependency.
fn flate2_gzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let len = bytes.len() as u16;
    out.push(1);
    out.extend(len.to_le_bytes());
    out.extend((!len).to_le_bytes());
    out.extend(bytes);
    out.extend(crc32(bytes).to_le_bytes());
    out.extend((bytes.len() as u32).to_le_bytes());
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A tiny app: answers every request with `body` (404 while it is `None`), one request per
/// connection.
async fn spec_app(body: std::sync::Arc<std::sync::Mutex<Option<String>>>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let current = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, text) = match current {
                    Some(t) => ("200 OK", t),
                    None => ("404 Not Found", String::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    text.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(text.as_bytes()).await;
            });
        }
    });
    addr
}

async fn listed(endpoints: &[String]) -> Vec<(String, String)> {
    let cfg = mesh_agent::config::EtcdConfig::new(endpoints.to_vec());
    api::entries(&cfg)
        .await
        .map(|es| es.into_iter().map(|e| (e.service, e.version)).collect())
        .unwrap_or_default()
}

// A current-thread runtime: the sidecar's tasks run on this thread, where the capturing
// subscriber is the default.
#[tokio::test]
async fn the_sidecar_stores_the_document_its_app_serves_and_keeps_the_last_good() {
    let logs = mesh_agent::logging::Captured::default();
    let _default = tracing::dispatcher::set_default(&logs.subscriber(
        mesh_agent::logging::LogFormat::Json,
        "warn,mesh_agent::api_fetch=info",
    ));
    let etcd = EtcdCluster::start(1).await;
    let endpoints = etcd.endpoints();
    let pki = trellis_tests::Pki::new(&["orders"]);
    let body = std::sync::Arc::new(std::sync::Mutex::new(None));
    let app = spec_app(body.clone()).await;
    let sidecar = trellis_tests::etcd_sidecar(&pki, "orders", app, endpoints.clone(), |c| {
        let mut a = mesh_agent::config::ApiSpecFetchConfig::new("/openapi.json");
        a.interval = Duration::from_secs(1);
        a.timeout = Duration::from_secs(1);
        c.api_spec = Some(a);
    })
    .await;
    let limit = Duration::from_secs(15);

    // The app answers 404 first (still starting): nothing stored, the sidecar serves anyway.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(listed(&endpoints).await.is_empty());
    trellis_tests::wait_for(limit, "the sidecar ready", || async {
        trellis_tests::client::admin(sidecar.bound.admin, "/ready")
            .await
            .status
            == 200
    })
    .await;

    // It serves its document: listed under info.version.
    *body.lock().unwrap() = Some(v1().to_string());
    let started = Instant::now();
    trellis_tests::wait_for(limit, "1.0.0 listed", || async {
        listed(&endpoints).await == [("orders".to_string(), "1.0.0".to_string())]
    })
    .await;
    eprintln!("listed {:?} after the app served it", started.elapsed());

    // An invalid one: logged once with the reason, counted, the last good kept.
    let mut bad = v1();
    bad["paths"]["/orders"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        ["items"]["$ref"] = json!("#/components/schemas/Missing");
    bad["info"]["version"] = json!("1.1.0");
    *body.lock().unwrap() = Some(bad.to_string());
    let invalid = "the app's OpenAPI document is invalid; not stored, the last good one stays";
    let deadline = Instant::now() + limit;
    while !logs.lines().iter().any(|l| l.contains(invalid)) {
        assert!(Instant::now() < deadline, "not logged: {:#?}", logs.lines());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several more rounds with the same body: not logged again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let lines: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains(invalid))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("$.paths") && lines[0].contains("Missing"),
        "{}",
        lines[0]
    );
    assert_eq!(
        listed(&endpoints).await,
        [("orders".to_string(), "1.0.0".to_string())]
    );
    let metrics = trellis_tests::client::admin(sidecar.bound.admin, "/metrics")
        .await
        .body;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("api_spec_fetch_failures_total{kind=\"invalid\"} 1")),
        "{metrics}"
    );

    // A new valid version: listed next to the first.
    *body.lock().unwrap() = Some(v2().to_string());
    trellis_tests::wait_for(limit, "2.0.0 listed too", || async {
        listed(&endpoints).await
            == [
                ("orders".to_string(), "1.0.0".to_string()),
                ("orders".to_string(), "2.0.0".to_string()),
            ]
    })
    .await;
    let got = api::get(
        &mesh_agent::config::EtcdConfig::new(endpoints.clone()),
        "orders",
        Some("2.0.0"),
    )
    .await
    .unwrap();
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got, v2());
}

/// The portal: an ingress with `portal` serves the public view from etcd on its own host,
/// through its routes, without routing those requests; and keeps serving it when etcd is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_portal_serves_the_public_documents_and_survives_etcd_loss() {
    let mut etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoints()[0].clone();
    store_orders_and_billing(&ep).await;
    let route = "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: shop}\nspec:\n  hosts: [api.example.com]\n  gateways: [edge]\n  rules:\n  - matches: [{path: {prefix: /shop}}]\n    rewrite: {path_prefix: /orders}\n    backends: [{service: orders}]\n";
    apply(&etcd, route).await;

    let pki = trellis_tests::Pki::new(&["edge"]);
    let web = trellis_tests::web::WebPki::new();
    web.leaf(pki.path(), "portal", &["developer.example.com"]);
    let app: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let gateway = trellis_tests::etcd_sidecar(&pki, "edge", app, etcd.endpoints(), |c| {
        let mut ingress = trellis_tests::web::loopback_ingress(
            pki.path(),
            &[("developer.example.com", "portal")],
            false,
        );
        ingress.portal = Some(trellis_proxy::config::PortalConfig {
            host: "developer.example.com".into(),
            public_url: Some("https://api.example.com".into()),
            open_signup: false,
        });
        c.proxy.ingress = Some(ingress);
    })
    .await;
    let plain = gateway.bound.ingress_http.expect("http bound");
    let client = trellis_tests::client::h1(plain);
    let get = |path: &str| {
        let client = &client;
        let uri = format!("http://developer.example.com{path}");
        async move { trellis_tests::client::get(client, &uri).await }
    };
    trellis_tests::wait_for(
        Duration::from_secs(15),
        "the portal's first documents",
        || async { get("/openapi.json").await.status == 200 },
    )
    .await;

    let all = get("/openapi.json").await;
    assert_eq!(all.headers["content-type"], "application/json");
    let doc = all.json();
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    assert_eq!(paths, ["/shop", "/shop/{id}"], "{doc:#}");
    assert_eq!(doc["servers"][0]["url"], "https://api.example.com");
    trellis_policies::validate_openapi(&doc).expect("valid OpenAPI");
    let catalog = get("/apis").await.json();
    assert_eq!(catalog.as_array().unwrap().len(), 1, "{catalog:#}");
    assert_eq!(catalog[0]["service"], "orders");
    assert_eq!(catalog[0]["title"], "Orders API");
    assert_eq!(catalog[0]["paths"], 2);
    let one = get("/apis/orders/openapi.json").await.json();
    assert_eq!(one["info"]["title"], "Orders API");
    // Internal services are not published; the portal's host is never routed.
    assert_eq!(get("/apis/billing/openapi.json").await.status, 404);
    assert_eq!(get("/shop").await.status, 404);
    let post = http::Request::post("http://developer.example.com/openapi.json")
        .body(trellis_tests::client::empty())
        .unwrap();
    let post = trellis_tests::client::send(&client, post).await.unwrap();
    assert_eq!(post.status, 405);

    // etcd gone: after a refresh failed, the last documents keep being served.
    etcd.members[0].kill();
    let admin = gateway.bound.admin;
    let limit = mesh_agent::portal::REFRESH + Duration::from_secs(15);
    trellis_tests::wait_for(limit, "a failed portal refresh", || async {
        let text = trellis_tests::client::admin(admin, "/metrics").await.body;
        trellis_tests::client::metric(&text, "trellis_portal_refresh_failures_total") >= 1.0
    })
    .await;
    let after = get("/openapi.json").await;
    assert_eq!(after.status, 200);
    assert_eq!(after.json(), doc);
}
