//! The attempt loop: one request to a mesh service, tried on one endpoint after another.
//!
//! Each [`Attempt`] ends in a [`Next`]: done (a response, or an error to answer with), redial
//! (the pooled connection handed the request back unsent: the same endpoint on a fresh
//! connection, not a retry), or reselect (a retry on another endpoint, allowed by the policy,
//! the budget and the `max_retries` breaker). The loop owns the time: an overall deadline, and
//! a per-try timeout within it.

use std::net::IpAddr;
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;

use super::connector::{Connector, Sent};
use super::endpoints::Endpoints;
use super::payload::Payload;
use super::resolve::Resolved;
use crate::error::ProxyError;
use crate::http::headers::strip_hop_by_hop;
use crate::policy::breaker::{Breaker, Permit};
use crate::policy::retry::retry_after;
use crate::state::balance::InFlight;
use crate::telemetry::trace::RequestSpan;
use crate::RequestBody;

/// The attempts of one request.
pub(super) struct Attempts<'a, C> {
    connector: &'a C,
    endpoints: Endpoints<'a>,
    client: IpAddr,
    payload: Payload,
    connect_timeout: Duration,
    /// The request timeout, counted from the first attempt.
    deadline: Instant,
    /// The caller sent a gRPC deadline: each attempt carries the time that remains.
    grpc_deadline: bool,
    /// Attempts made so far (0 for the first try).
    attempt: u32,
    /// The endpoint the last retry left.
    exclude: Option<usize>,
    /// A closing pooled connection handed the request back unsent once already.
    handed_back: bool,
}

/// What one attempt leaves the loop to do.
pub(super) enum Next<'a, B> {
    /// A response, or the error to answer with.
    Done(Result<(Response<B>, InFlight), ProxyError>),
    /// Dial the same endpoint again: the request (when streamed) was never sent.
    Redial(Request<RequestBody>),
    /// Try another endpoint: a retry holds a `max_retries` slot; a request moved after a
    /// refused connection holds none (see [`Attempts::after_connect_error`]).
    Reselect {
        unsent: Option<Request<RequestBody>>,
        permit: Option<Permit<'a>>,
    },
}

// === impl Attempts ===

impl<'a, C: Connector> Attempts<'a, C> {
    pub fn new(
        connector: &'a C,
        endpoints: Endpoints<'a>,
        client: IpAddr,
        payload: Payload,
        limits: &Resolved,
    ) -> Self {
        Self {
            connector,
            endpoints,
            client,
            payload,
            connect_timeout: limits.connect_timeout,
            deadline: Instant::now() + limits.request_timeout,
            grpc_deadline: limits.grpc_deadline,
            attempt: 0,
            exclude: None,
            handed_back: false,
        }
    }

    /// Try endpoint `first`, then as the attempts decide. The response's in-flight guard is
    /// held until its body ends (least request and peak-EWMA see long streams as load).
    pub async fn run(
        mut self,
        first: usize,
        span: &mut RequestSpan,
    ) -> Result<(Response<C::Body>, InFlight), ProxyError> {
        let mut i = first;
        let mut unsent = None;
        let mut reselect = false;
        // Held while a retry is in flight (the max_retries breaker).
        let mut _retrying = None;
        loop {
            let Some(req) = self.payload.request(unsent.take(), self.attempt) else {
                let addr = self.endpoints.route.service.endpoints[i].addr;
                let message = "request body already sent".into();
                return Err(ProxyError::Upstream { addr, message });
            };
            if reselect {
                i = self.endpoints.choose(&req, self.client, self.exclude)?;
            }
            let attempt = Attempt { i, req };
            match attempt.run(&mut self, span).await {
                Next::Done(result) => return result,
                Next::Redial(req) => {
                    self.handed_back = true;
                    unsent = Some(req);
                    reselect = false;
                }
                Next::Reselect {
                    unsent: req,
                    permit,
                } => {
                    _retrying = permit;
                    unsent = req;
                    self.exclude = Some(i);
                    self.attempt += 1;
                    reselect = true;
                }
            }
        }
    }

    /// Nothing was sent: any request, streaming or not, can go to another endpoint (retrying
    /// the same one would repeat the same failure). This is re-routing, not a retry: the
    /// failed endpoint received nothing and the next one gets the request it would otherwise
    /// not have seen, so it takes no `max_retries` slot. Otherwise, with that breaker's
    /// default of 3, an instance dying under more than 3 concurrent requests failed the
    /// others with 502 while healthy endpoints stood by. The retry budget still applies, and
    /// the number of tries stays bounded by the policy's attempts (at least one move).
    fn after_connect_error(
        &self,
        i: usize,
        e: ProxyError,
        req: Request<RequestBody>,
    ) -> Next<'a, C::Body> {
        self.endpoints.outcome(i, Err(&e));
        let route = self.endpoints.route;
        if route.service.endpoints.len() > 1
            && self.attempt < route.retry.attempts.max(1)
            && self.endpoints.withdraw()
        {
            let unsent = Some(req);
            return Next::Reselect {
                unsent,
                permit: None,
            };
        }
        Next::Done(Err(e))
    }

    /// After an attempt that reached the endpoint: the wait before a retry and its
    /// `max_retries` slot, when the policy says so and the budget, the breaker and the
    /// deadline allow it; `None` when the result stands.
    fn retry<B>(&self, result: &Result<Response<B>, ProxyError>) -> Option<(Duration, Permit<'a>)> {
        let retry = &self.endpoints.route.retry;
        let retryable = self.payload.replayable()
            && self.attempt < retry.attempts
            && match result {
                Ok(resp) => retryable_response(retry, resp),
                Err(ProxyError::Upstream { .. }) => true,
                Err(ProxyError::ResponseTimeout { .. }) => retry.per_try_timeout.is_some(),
                Err(_) => false,
            };
        if !retryable {
            return None;
        }
        let wait = match result {
            Ok(resp) => retry_after(resp.headers()),
            Err(_) => None,
        }
        .unwrap_or_else(|| {
            let budget = &self.endpoints.route.counters.budget;
            budget.backoff(self.attempt, retry.backoff_base, retry.backoff_max)
        });
        if Instant::now() + wait >= self.deadline || !self.endpoints.withdraw() {
            return None;
        }
        Some((wait, self.endpoints.retry_permit()?))
    }
}

/// One try on one endpoint.
struct Attempt {
    i: usize,
    req: Request<RequestBody>,
}

// === impl Attempt ===

impl Attempt {
    async fn run<'a, C: Connector>(
        self,
        attempts: &mut Attempts<'a, C>,
        span: &mut RequestSpan,
    ) -> Next<'a, C::Body> {
        let Attempt { i, mut req } = self;
        let endpoints = attempts.endpoints;
        let route = endpoints.route;
        let ep = &route.service.endpoints[i];
        span.upstream(ep.addr, &ep.identity, attempts.attempt);
        let Some(pending) = route.counters.pending(route.max_pending) else {
            return Next::Done(Err(endpoints.overflow(Breaker::MaxPending)));
        };
        let connected = attempts
            .connector
            .connect(ep, attempts.connect_timeout)
            .await;
        drop(pending);
        let conn = match connected {
            Ok(conn) => conn,
            Err(e) => return attempts.after_connect_error(i, e, req),
        };
        let stats = &route.stats[i];
        // Counted in flight (least request, peak-EWMA) until the response headers arrive.
        let in_flight = stats.start();
        let started = std::time::Instant::now();
        let remaining = attempts.deadline.saturating_duration_since(Instant::now());
        let per_try = route
            .retry
            .per_try_timeout
            .map_or(remaining, |t| t.min(remaining));
        if attempts.grpc_deadline {
            let value = crate::http::grpc::encode_timeout(remaining);
            req.headers_mut()
                .insert(crate::http::grpc::TIMEOUT_HEADER, value);
        }
        let sent = attempts.connector.send(ep, conn, req);
        let result = match tokio::time::timeout(per_try, sent).await {
            Ok(Sent::Done(result)) => result,
            Ok(Sent::HandedBack(req)) if !attempts.handed_back => {
                // The pooled connection was closing (the peer draining) and gave the request
                // back before writing it: dial again. Nothing was sent, so this is not a
                // retry; if the peer is gone, the connect failure moves the request to
                // another endpoint like any other.
                attempts.connector.invalidate(ep);
                return Next::Redial(req);
            }
            Ok(Sent::HandedBack(_)) => Err(ProxyError::Upstream {
                addr: ep.addr,
                message: "a fresh connection refused the request before sending it".into(),
            }),
            Err(_) => Err(crate::http::client_error::response_timeout(
                ep.addr, per_try,
            )),
        };
        if let Some(fault) = attempts.payload.client_fault(&result) {
            // The client broke its own request: not the endpoint's failure, no retry.
            return Next::Done(Err(fault));
        }
        stats.observe_rtt(started.elapsed());
        endpoints.outcome(i, result.as_ref().map(|r| r.status().as_u16()));
        if let Some((wait, permit)) = attempts.retry(&result) {
            // The endpoint stays loaded with this attempt until the retry leaves.
            tokio::time::sleep(wait).await;
            drop((result, in_flight));
            return Next::Reselect {
                unsent: None,
                permit: Some(permit),
            };
        }
        Next::Done(result.map(|mut resp| {
            strip_hop_by_hop(resp.headers_mut(), false);
            (resp, in_flight)
        }))
    }
}

/// A response the retry policy retries: a listed status, or a listed gRPC status in a
/// trailers-only response.
fn retryable_response<B>(retry: &trellis_policies::RetrySpec, resp: &Response<B>) -> bool {
    retry.retry_on_status.contains(&resp.status().as_u16())
        || resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|code| retry.retry_on_grpc.contains(&code))
}

#[cfg(test)]
mod tests;
