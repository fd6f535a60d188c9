//! End-to-end tests over real sockets: app client -> outbound sidecar -> mTLS -> inbound
//! sidecar -> app server, all on loopback.

mod access;
mod access_log;
mod admin;
mod app_protocol;
mod balance;
mod client_faults;
mod dashboard;
mod discovery;
mod dns;
mod drain;
mod edge;
mod errors;
mod etcd;
mod etcd_faults;
mod etcd_proxy;
mod etcd_security;
mod examples_compose;
mod grpc;
mod http;
mod http_route;
mod identity;
mod ingress;
mod limits;
mod logs;
mod policy_history;
mod prometheus;
mod ratelimit;
mod ratelimit_global;
mod retry;
mod rotation;
mod slow_readers;
mod store;
mod streaming;
mod tracing;
mod websocket;
