//! JSONPatch (RFC 6902) between two pods.
