//! Rate-limit keys and shares (`proxy/src/ratelimit/key.rs` `RequestKey::hash`, and the global
//! limits' demand table, `mesh-agent/src/etcd/ratelimit.rs` `parse_entry` and `allocation`):
//! the request parts a key is made of (headers, peer identity, consumer, source address, from
//! clients), and the demand other sidecars publish in etcd (JSON, hex key hashes, rates).
//!
//! Input: `limitkey\0headers\0peer\0consumer\0demand\0demand...`: a `LimitKey` (JSON, else
//! derived from the first byte), `name: value` header lines, the peer identity and consumer,
//! then demand entries, each `instance\njson`.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_policies::LimitKey;

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"{\"client_identity\":true,",
    b"\"source_ip\":true,",
    b"\"consumer\":true,",
    b"\"headers\":[\"x-tenant\"]}",
    b"\0",
    b"x-tenant: ",
    b"\n",
    b"spiffe://trellis.local/service/a",
    b"{\"policies\":{\"p\":{",
    b"\"00000000000000ff\":",
    b"\"ffffffffffffffff\":",
    b"\"-1\":",
    b"\"+f\":",
    b"1e308",
    b"-0.0",
    b"1e-320",
    b"}}}",
    b"{",
    b"}",
    b"\"",
    b",",
    b":",
];

pub fn run(data: &[u8]) -> u64 {
    let parts = crate::split(data, 40);
    let part = |i: usize| parts.get(i).copied().unwrap_or_default();
    let key: LimitKey = serde_json::from_slice(part(0)).unwrap_or_else(|_| {
        let b = part(0).first().copied().unwrap_or(0);
        LimitKey {
            client_identity: b & 1 != 0,
            source_ip: b & 2 != 0,
            headers: if b & 4 != 0 {
                vec!["x-tenant".into(), "x-user".into()]
            } else {
                vec![]
            },
            consumer: b & 8 != 0,
        }
    });
    let mut headers = HeaderMap::new();
    for line in part(1).split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(n, v);
        }
    }
    let peer = HeaderValue::from_bytes(part(2)).ok();
    let consumer = std::str::from_utf8(part(3)).ok();
    let mut ip = [0u8; 16];
    for (i, b) in part(0).iter().take(16).enumerate() {
        ip[i] = *b;
    }
    for source in [IpAddr::from(ip), IpAddr::from([ip[0], ip[1], ip[2], ip[3]])] {
        let hash = || {
            trellis_proxy::policy::ratelimit::fuzz_key_hash(
                &headers,
                peer.as_ref(),
                source,
                consumer,
                "policy",
                &key,
            )
        };
        let h = hash();
        assert_ne!(h, 0, "key hash 0 is reserved");
        assert_eq!(h, hash(), "the key of a request is stable");
    }
    // The demand table: every participant's shares of a key add up to at most the limit.
    let prefix = "/trellis/v1/ratelimit/orders/";
    let entries: Vec<(Vec<u8>, &[u8])> = parts[4.min(parts.len())..]
        .iter()
        .map(|e| {
            let (id, json) = match e.iter().position(|&b| b == b'\n') {
                Some(i) => (&e[..i], &e[i + 1..]),
                None => (&b""[..], *e),
            };
            ([prefix.as_bytes(), id].concat(), json)
        })
        .collect();
    let kvs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (k.as_slice(), *v)).collect();
    let limit = 100.0;
    let ids: std::collections::BTreeSet<String> = entries
        .iter()
        .filter_map(|(k, _)| {
            std::str::from_utf8(&k[prefix.len()..])
                .ok()
                .map(str::to_string)
        })
        .collect();
    let mut sums: std::collections::HashMap<u64, f64> = Default::default();
    let mut peers = 0;
    let mut label = String::new();
    for id in &ids {
        let (default, keys, n, listed) =
            mesh_agent::etcd::ratelimit::fuzz_shares(prefix, &kvs, id, "p", limit);
        assert!(
            default.is_finite() && default >= 0.0 && default <= limit,
            "default share {default}"
        );
        for (k, s) in keys {
            assert!(s.is_finite() && s >= 0.0, "share {s} for key {k:x}");
            // A newcomer (not in the table) takes its share on top, by design, until the
            // others see its entry: only the table's participants must add up to the limit.
            if listed {
                *sums.entry(k).or_default() += s;
            }
        }
        peers = n;
    }
    for (k, total) in &sums {
        assert!(
            *total <= limit * (1.0 + 1e-9),
            "shares of key {k:x} add up to {total} > {limit}"
        );
    }
    let (_, _, newcomer, _) =
        mesh_agent::etcd::ratelimit::fuzz_shares(prefix, &kvs, "\u{1}new", "p", limit);
    for n in [peers, newcomer, sums.len()] {
        label.push_str(crate::count(n));
        label.push(' ');
    }
    outcome(&label)
}
