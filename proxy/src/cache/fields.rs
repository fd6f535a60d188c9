//! A stored response's header fields: the values copied into one buffer the entry owns, the
//! names and value handles in one list, in the order the origin sent them. Not a `HeaderMap`:
//! building one per stored miss (its hash index and entry table, every name hashed and
//! placed) and the lookups done on it afterwards cost about 2,100 instructions per stored
//! miss more than this list (docs/caching.md#benchmark), while an entry only ever reads a few
//! of its fields (by a linear scan of a handful) and hands all of them to a hit, which builds
//! its response's map from this list ([`Fields::to_map`]).
//!
//! The names are `HeaderName`s rather than bytes in the buffer: a standard name is a tag and a
//! custom one shares its bytes, so a hit clones them for the cost of a copy or a reference
//! count, where parsing names again from bytes would cost every hit a lookup (and an
//! allocation per custom name).

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// The stored header fields of one response (see the module's doc).
#[derive(Clone, Debug, Default)]
pub struct Fields {
    list: Box<[(HeaderName, HeaderValue)]>,
    /// The names' and values' bytes, for the entry's weight.
    bytes: usize,
}

// === impl Fields ===

impl Fields {
    /// A copy of these fields that owns its values, `count` of them with `len` bytes of values
    /// (known from the walk that checked the response: the buffer is sized once).
    ///
    /// A parsed header value is a slice of the connection's read buffer (hyper's HTTP/1 parser
    /// and h2's HPACK decoder both slice it): stored as it is, every entry would keep a whole
    /// read buffer (8 KiB or more) alive for a few hundred bytes of headers, so a cache bounded
    /// at 64 MiB held 700 MB, and every response made the connection allocate a fresh buffer.
    pub fn copied<'a>(
        fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
        count: usize,
        len: usize,
    ) -> Self {
        Self::copied_with_room(fields, count, len, 0).0
    }

    /// [`Fields::copied`], their buffer allocated with `room` bytes more, returned empty
    /// after the values: the body's buffer, in the same allocation (one allocation and one
    /// free less per stored response; they live and die with the entry together). An entry
    /// refreshed by a 304 copies its new values into a buffer of their own and keeps the
    /// body's, with the old values in it: a few hundred bytes, until the entry goes.
    pub fn copied_with_room<'a>(
        fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
        count: usize,
        len: usize,
        room: usize,
    ) -> (Self, BytesMut) {
        let mut buf = BytesMut::with_capacity(len + room);
        let mut list: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(count);
        let mut bytes = 0;
        for (name, v) in fields {
            // Sized: not reallocated unless the walk was wrong, which only costs a copy.
            buf.extend_from_slice(v.as_bytes());
            bytes += name.as_str().len() + v.len();
            list.push((name.clone(), v.clone()));
        }
        // One split (the buffer shared from here on), then each value a slice of it, in the
        // order written: `copies` is exactly the values' bytes, one after another.
        let copies = buf.split().freeze();
        let mut at = 0;
        for (_, value) in list.iter_mut() {
            let end = at + value.len();
            *value = owned(copies.slice(at..end), value);
            at = end;
        }
        let fields = Self {
            list: list.into_boxed_slice(),
            bytes,
        };
        (fields, buf)
    }

    /// [`Fields::copied`] of a whole header map (tests, entries read from disk).
    pub fn of(h: &HeaderMap) -> Self {
        let len = h.iter().map(|(_, v)| v.len()).sum();
        Self::copied(h.iter(), h.len(), len)
    }

    /// The response's header map for a hit, with room for `extra` more fields (`Age`, the
    /// cache status) so that adding them does not grow it.
    pub fn to_map(&self, extra: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.list.len() + extra);
        for (name, value) in self.iter() {
            map.append(name.clone(), value.clone());
        }
        map
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> + Clone {
        self.list.iter().map(|(n, v)| (n, v))
    }

    /// The first value of `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.list.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn contains_key(&self, name: &HeaderName) -> bool {
        self.list.iter().any(|(n, _)| n == name)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The bytes of the names and values.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// `value` again, its bytes `copy` (a copy of them) instead of its own.
///
/// Not validated again when ASCII: checking a copy of a valid value byte by byte cost 470
/// instructions per stored miss (docs/caching.md#benchmark), where `is_ascii` reads a word at
/// a time.
fn owned(copy: Bytes, value: &HeaderValue) -> HeaderValue {
    debug_assert_eq!(copy.as_ref(), value.as_bytes());
    let mut out = if copy.is_ascii() {
        // SAFETY: `from_maybe_shared_unchecked` requires valid UTF-8 (its documented
        // contract) and the bytes must be a valid header value (so that `HeaderValue`'s own
        // invariant holds). `copy` is ASCII, checked just above, hence UTF-8; and it holds
        // exactly the bytes of `value`, a `HeaderValue` (validated when it was made), copied
        // by the caller into a buffer nothing writes to after it was frozen.
        unsafe { HeaderValue::from_maybe_shared_unchecked(copy) }
    } else {
        HeaderValue::from_maybe_shared(copy).unwrap_or_else(|_| value.clone())
    };
    out.set_sensitive(value.is_sensitive());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_their_order_duplicates_and_sensitivity() {
        let mut h = HeaderMap::new();
        h.append("x-two", HeaderValue::from_static("a"));
        h.append("content-type", HeaderValue::from_static("text/plain"));
        h.append("x-two", HeaderValue::from_static("b"));
        let mut secret = HeaderValue::from_static("s");
        secret.set_sensitive(true);
        h.append("x-secret", secret);
        let f = Fields::of(&h);
        assert_eq!(f.len(), 4);
        let two = HeaderName::from_static("x-two");
        let all: Vec<_> = f
            .iter()
            .filter(|(n, _)| **n == two)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(all, ["a", "b"]);
        assert_eq!(f.get(&http::header::CONTENT_TYPE).unwrap(), "text/plain");
        assert!(!f.contains_key(&http::header::ETAG));
        assert_eq!(f.bytes(), 5 + 1 + 12 + 10 + 5 + 1 + 8 + 1);
        let map = f.to_map(2);
        assert_eq!(map.len(), 4);
        assert!(map.capacity() >= 6, "room for Age and the status");
        assert_eq!(map.get_all("x-two").iter().count(), 2);
        assert!(map["x-secret"].is_sensitive());
    }

    #[test]
    fn non_ascii_values_are_copied_and_checked() {
        let mut h = HeaderMap::new();
        h.append("x-latin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        h.append("etag", HeaderValue::from_static("\"v\""));
        let f = Fields::of(&h);
        assert_eq!(
            f.get(&HeaderName::from_static("x-latin"))
                .unwrap()
                .as_bytes(),
            b"caf\xe9"
        );
        assert_eq!(f.get(&http::header::ETAG).unwrap(), "\"v\"");
    }

    #[test]
    fn the_room_after_the_values_is_one_buffer_with_them() {
        let mut h = HeaderMap::new();
        h.append("etag", HeaderValue::from_static("\"v\""));
        let (f, mut room) = Fields::copied_with_room(h.iter(), 1, 3, 5);
        assert_eq!(f.get(&http::header::ETAG).unwrap(), "\"v\"");
        assert!(room.is_empty() && room.capacity() >= 5);
        let before = room.capacity();
        room.extend_from_slice(b"hello");
        assert_eq!(room.capacity(), before, "no allocation for what fits");
        let body = room.freeze();
        let value = f
            .get(&http::header::ETAG)
            .unwrap()
            .as_bytes()
            .as_ptr_range();
        assert_eq!(value.end, body.as_ptr(), "the body follows the values");
    }

    #[test]
    fn values_do_not_keep_the_source_buffer_alive() {
        let buf = Bytes::from(vec![b'x'; 8192]);
        let mut h = HeaderMap::new();
        h.append(
            "etag",
            HeaderValue::from_maybe_shared(buf.slice(0..4)).unwrap(),
        );
        // A wrong size from the walk only costs a larger copy.
        let f = Fields::copied(h.iter(), 0, 1);
        let range = buf.as_ptr_range();
        let p = f.iter().next().unwrap().1.as_bytes().as_ptr();
        assert!(!(range.start..range.end).contains(&p));
        assert_eq!(f.get(&http::header::ETAG).unwrap(), "xxxx");
    }
}
