//! The targets, one module each; [`ALL`] lists them for the drivers.

use crate::Target;

pub mod etcd;
pub mod grpc_timeout;
pub mod inject;
pub mod json_body;
pub mod jwks;
pub mod jwt;
pub mod openapi;
pub mod policy;
pub mod protocol;
pub mod ratelimit;
pub mod routing;
pub mod spiffe;
pub mod transcode;

pub static ALL: &[Target] = &[
    Target {
        name: "jwt",
        run: jwt::run,
        max_len: trellis_proxy::policy::auth::MAX_TOKEN_LEN + 64,
        dict: jwt::DICT,
        alloc_fixed: 1 << 20,
        alloc_per_byte: 64,
    },
    Target {
        name: "jwks",
        run: jwks::run,
        max_len: 64 * 1024,
        dict: jwks::DICT,
        alloc_fixed: 1 << 20,
        alloc_per_byte: 64,
    },
    Target {
        name: "policy",
        run: policy::run,
        max_len: 64 * 1024,
        dict: policy::DICT,
        alloc_fixed: 16 << 20,
        alloc_per_byte: 1024,
    },
    Target {
        name: "etcd",
        run: etcd::run,
        max_len: 64 * 1024,
        dict: etcd::DICT,
        alloc_fixed: 16 << 20,
        alloc_per_byte: 1024,
    },
    Target {
        name: "spiffe",
        run: spiffe::run,
        max_len: 8 * 1024,
        dict: spiffe::DICT,
        alloc_fixed: 256 << 10,
        alloc_per_byte: 64,
    },
    Target {
        name: "routing",
        run: routing::run,
        max_len: 32 * 1024,
        dict: routing::DICT,
        alloc_fixed: 16 << 20,
        alloc_per_byte: 1024,
    },
    Target {
        name: "grpc_timeout",
        run: grpc_timeout::run,
        max_len: 1024,
        dict: grpc_timeout::DICT,
        alloc_fixed: 64 << 10,
        alloc_per_byte: 64,
    },
    Target {
        name: "ratelimit",
        run: ratelimit::run,
        max_len: 16 * 1024,
        dict: ratelimit::DICT,
        alloc_fixed: 1 << 20,
        alloc_per_byte: 256,
    },
    Target {
        name: "protocol",
        run: protocol::run,
        max_len: 4 * 1024,
        dict: protocol::DICT,
        alloc_fixed: 256 << 10,
        alloc_per_byte: 64,
    },
    Target {
        name: "openapi",
        run: openapi::run,
        max_len: 64 * 1024,
        dict: openapi::DICT,
        alloc_fixed: 16 << 20,
        alloc_per_byte: 1024,
    },
    Target {
        name: "inject",
        run: inject::run,
        max_len: 64 * 1024,
        dict: inject::DICT,
        alloc_fixed: 16 << 20,
        alloc_per_byte: 1024,
    },
    Target {
        name: "transcode",
        run: transcode::run,
        max_len: 16 * 1024,
        dict: transcode::DICT,
        alloc_fixed: 4 << 20,
        alloc_per_byte: 1024,
    },
    Target {
        name: "json_body",
        run: json_body::run,
        max_len: 16 * 1024,
        dict: json_body::DICT,
        // the schemas, compiled on the first input
        alloc_fixed: 16 << 20,
        alloc_per_byte: 64,
    },
];
