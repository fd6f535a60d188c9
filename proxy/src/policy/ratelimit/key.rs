//! The key of a request under a policy, as a 64-bit hash that every sidecar computes the same
//! way: the policy name, then each key part the policy names, in the fixed order of
//! [`LimitKey`]'s fields, each tagged and length-prefixed so that no two different tuples can
//! run together into the same bytes. The hash is [`StableHasher`] (fixed FNV-1a + finalizer),
//! not `std`'s hasher, whose algorithm may differ between builds.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};
use trellis_policies::LimitKey;

use crate::state::balance::StableHasher;

/// Buckets by key hash. The keys are already well-mixed hashes, so the map does not hash again.
pub type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// What a request offers for its key.
pub struct RequestKey<'a> {
    pub headers: &'a HeaderMap,
    pub peer: Option<&'a HeaderValue>,
    pub source: IpAddr,
    pub consumer: Option<&'a str>,
}

// === impl RequestKey ===

impl RequestKey<'_> {
    pub fn hash(&self, policy: &str, key: &LimitKey) -> u64 {
        let mut h = StableHasher::new();
        part(&mut h, b'p', policy.as_bytes());
        if key.client_identity {
            match self.peer {
                Some(id) => part(&mut h, b'i', id.as_bytes()),
                None => part(&mut h, b'I', b""),
            }
        }
        if key.source_ip {
            match self.source {
                IpAddr::V4(ip) => part(&mut h, b'4', &ip.octets()),
                IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                    Some(v4) => part(&mut h, b'4', &v4.octets()),
                    None => part(&mut h, b'6', &ip.octets()),
                },
            }
        }
        for name in &key.headers {
            match self.headers.get(name.as_str()) {
                Some(v) => part(&mut h, b'h', v.as_bytes()),
                None => part(&mut h, b'H', b""),
            }
        }
        if key.consumer {
            match self.consumer {
                Some(c) => part(&mut h, b'c', c.as_bytes()),
                None => part(&mut h, b'C', b""),
            }
        }
        h.finish().max(1)
    }
}

fn part(h: &mut StableHasher, tag: u8, value: &[u8]) {
    h.write(&[tag]);
    h.write(&(value.len() as u32).to_be_bytes());
    h.write(value);
}

/// A `Hasher` for keys that are already hashes.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client_identity: bool, source_ip: bool, headers: &[&str]) -> LimitKey {
        LimitKey {
            client_identity,
            source_ip,
            headers: headers.iter().map(|s| s.to_string()).collect(),
            consumer: false,
        }
    }

    #[test]
    fn same_request_same_key_different_parts_different_keys() {
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", HeaderValue::from_static("acme"));
        let peer = HeaderValue::from_static("spiffe://td/service/a");
        let r = RequestKey {
            headers: &headers,
            peer: Some(&peer),
            source: "10.0.0.1".parse().unwrap(),
            consumer: None,
        };
        let k = key(true, true, &["x-tenant"]);
        assert_eq!(r.hash("p", &k), r.hash("p", &k));
        assert_ne!(r.hash("p", &k), r.hash("q", &k));
        // Known value (computed independently in Python): it must never change between builds.
        assert_eq!(r.hash("p", &LimitKey::default()), 0x191c_a82e_c6a6_5faa);
        let other_tenant = {
            let mut h = headers.clone();
            h.insert("x-tenant", HeaderValue::from_static("acme2"));
            h
        };
        let r2 = RequestKey {
            headers: &other_tenant,
            ..r
        };
        assert_ne!(r.hash("p", &k), r2.hash("p", &k));
        // Without the header in the key, tenants share a bucket.
        assert_eq!(
            r.hash("p", &key(true, true, &[])),
            r2.hash("p", &key(true, true, &[]))
        );
        // An IPv4-mapped IPv6 source is the same client as its IPv4 form.
        let mapped = RequestKey {
            headers: &headers,
            peer: Some(&peer),
            source: "::ffff:10.0.0.1".parse().unwrap(),
            consumer: None,
        };
        assert_eq!(r.hash("p", &k), mapped.hash("p", &k));
        // Consumers key apart; no consumer is its own key.
        let by_consumer = LimitKey {
            consumer: true,
            ..LimitKey::default()
        };
        let acme = RequestKey {
            consumer: Some("acme"),
            ..r
        };
        let anon = RequestKey {
            consumer: None,
            ..r
        };
        assert_ne!(acme.hash("p", &by_consumer), anon.hash("p", &by_consumer));
        assert_eq!(
            anon.hash("p", &LimitKey::default()),
            acme.hash("p", &LimitKey::default())
        );
    }
}
