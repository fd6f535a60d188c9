//! Logs that join traces: the trace and span ids of the request a task is handling, for the
//! log formatter to add to the lines it writes.
//!
//! Each listener runs its request future inside [`scope`] (and the refusal of a failed request
//! inside [`sync_scope`]), a tokio task-local holding the ids as plain `Copy` data. Nothing is
//! allocated per request: entering the scope moves the ids in and out of a thread-local on
//! each poll, and they are read ([`current`]) only by a formatter that is writing a line. A `tracing` span per request (what tracing-opentelemetry
//! reads ids from) would allocate in the subscriber's registry for every request, logged or
//! not (docs/observability.md#logs-that-join-traces has the figures).
//!
//! Work spawned into other tasks does not see the scope unless it is wrapped in [`inherit`].

use std::future::Future;

use opentelemetry::trace::{SpanId, TraceId};

/// The span a log line belongs to: the sidecar's span for the request (server span inbound
/// and at the ingress, client span outbound), sampled or not, as the access log names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

tokio::task_local! {
    /// `None` when tracing is off (no ids exist), so every request future has one type.
    static REQUEST: Option<RequestIds>;
}

/// The ids of the request the current task is handling; `None` outside one (or when
/// tracing is off). Cheap, and called only for a line actually written.
pub fn current() -> Option<RequestIds> {
    REQUEST.try_with(|ids| *ids).ok().flatten()
}

/// Run `fut` (a request's handling) with `ids` readable by [`current`].
pub fn scope<F: Future>(ids: Option<RequestIds>, fut: F) -> impl Future<Output = F::Output> {
    REQUEST.scope(ids, fut)
}

/// `$fut.await` with `$ids` readable by [`current`], the way a listener awaits a request's
/// handling. Without ids (tracing off) there is nothing to scope, and the future is awaited as
/// it is: not moved once more into the scope's future (several KB: about 450 instructions of
/// copies per request on the inbound path, docs/performance.md) nor the task-local swapped at
/// each poll. Pass the call itself, not a future already made: built where it is awaited, it
/// is copied once less (measured). For a listener's outermost future only: inside another
/// scope, `None` must hide the outer ids and only [`scope`] does.
macro_rules! in_scope {
    ($ids:expr, $fut:expr) => {
        match $ids {
            None => $fut.await,
            ids => $crate::telemetry::trace::logs::scope(ids, $fut).await,
        }
    };
}
pub(crate) use in_scope;

/// Run `f` (a request's synchronous part, e.g. its refusal) with `ids` readable by [`current`].
pub fn sync_scope<R>(ids: Option<RequestIds>, f: impl FnOnce() -> R) -> R {
    REQUEST.sync_scope(ids, f)
}

/// `fut` with the ids of the request that spawns it: for a task spawned for one request
/// (a mirrored copy, an upgraded stream), whose lines belong to that request.
pub fn inherit<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    scope(current(), fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u8) -> Option<RequestIds> {
        Some(RequestIds {
            trace_id: TraceId::from_bytes([n; 16]),
            span_id: SpanId::from_bytes([n; 8]),
        })
    }

    #[tokio::test]
    async fn ids_are_seen_inside_the_scope_only() {
        assert_eq!(current(), None);
        let seen = scope(ids(1), async {
            tokio::task::yield_now().await;
            // A nested scope (the ingress's client span inside its server span) wins.
            let inner = scope(ids(2), async { current() }).await;
            (current(), inner)
        })
        .await;
        assert_eq!(seen, (ids(1), ids(2)));
        assert_eq!(current(), None);
        assert_eq!(sync_scope(ids(4), current), ids(4));
        assert_eq!(current(), None);
    }

    #[tokio::test]
    async fn a_spawned_task_sees_them_only_when_it_inherits() {
        let (plain, inherited) = scope(ids(3), async {
            let plain = tokio::spawn(async { current() });
            let inherited = tokio::spawn(inherit(async { current() }));
            (plain.await.unwrap(), inherited.await.unwrap())
        })
        .await;
        assert_eq!(plain, None);
        assert_eq!(inherited, ids(3));
    }

    #[test]
    fn off_the_runtime_there_are_none() {
        assert_eq!(current(), None);
    }
}
