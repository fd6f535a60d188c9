//! A request body read ahead by the edge (to validate it), carried with the request.
//!
//! The listeners hand requests around as `Request<Incoming>`, and an `Incoming` read to its
//! end cannot be refilled. So the bytes travel as a request extension instead, and whoever
//! sends the request upstream ([`crate::listeners::outbound`]'s payload, the external-origin
//! client) sends them in place of the (now empty) body.

use bytes::Bytes;
use http::Request;

/// The whole body, already read from the client.
#[derive(Clone, Debug)]
pub struct ReadAhead(pub Bytes);

/// The read-ahead body of `req`, taken out of its extensions.
pub fn take<B>(req: &mut Request<B>) -> Option<Bytes> {
    req.extensions_mut().remove::<ReadAhead>().map(|r| r.0)
}
