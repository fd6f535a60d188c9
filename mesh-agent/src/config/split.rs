//! The data plane's [`Config`] read out of a whole sidecar file: the top-level keys the agent
//! owns ([`AGENT_KEYS`]) are passed over, every other key goes to `Config`'s own derived
//! deserializer, which still refuses unknown keys.
//!
//! Why a wrapper: serde's `flatten` does not work with `deny_unknown_fields`, and taking the
//! agent's keys out of a parsed `Value` first would lose where things are (`from_value` errors
//! carry no line or column). Wrapped like this, the text is read once, in place, and
//! serde_norway marks every error, the unknown-key ones included, with its line and column.

use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use trellis_proxy::config::Config;

use super::AGENT_KEYS;

/// Deserialize the data plane's part of the document `de` reads.
pub(super) fn data_plane<'de, D: Deserializer<'de>>(de: D) -> Result<Config, D::Error> {
    Config::deserialize(SkipAgentKeys(de))
}

/// A deserializer whose top-level struct does not see the agent's keys.
struct SkipAgentKeys<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for SkipAgentKeys<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_struct(name, fields, TopLevel { visitor, fields })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// `Config`'s visitor, handed a map without the agent's entries.
struct TopLevel<V> {
    visitor: V,
    fields: &'static [&'static str],
}

impl<'de, V: Visitor<'de>> Visitor<'de> for TopLevel<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(WithoutAgentKeys {
            map,
            fields: self.fields,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_seq(seq)
    }
}

struct WithoutAgentKeys<A> {
    map: A,
    fields: &'static [&'static str],
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for WithoutAgentKeys<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = Some(seed);
        loop {
            let key = Key {
                seed: &mut seed,
                fields: self.fields,
            };
            match self.map.next_key_seed(key)? {
                None => return Ok(None),
                Some(Some(k)) => return Ok(Some(k)),
                Some(None) => {
                    self.map.next_value::<IgnoredAny>()?;
                }
            }
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// One top-level key: `None` for an agent key; an unknown key is refused here, naming the
/// agent's keys among the expected ones.
struct Key<'a, K> {
    seed: &'a mut Option<K>,
    fields: &'static [&'static str],
}

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for Key<'_, K> {
    type Value = Option<K::Value>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_identifier(self)
    }
}

impl<'de, K: DeserializeSeed<'de>> Visitor<'de> for Key<'_, K> {
    type Value = Option<K::Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("field identifier")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        if AGENT_KEYS.contains(&key) {
            return Ok(None);
        }
        if !self.fields.contains(&key) {
            return Err(E::unknown_field(key, accepted(self.fields)));
        }
        let seed = self
            .seed
            .take()
            .ok_or_else(|| E::custom("a key was read twice"))?;
        seed.deserialize(de::value::StrDeserializer::new(key))
            .map(Some)
    }
}

/// The data plane's keys and the agent's: every top-level key a sidecar file may have. Only
/// `Config` is read through here, so `fields` is always its list.
fn accepted(fields: &'static [&'static str]) -> &'static [&'static str] {
    static ACCEPTED: OnceLock<Vec<&'static str>> = OnceLock::new();
    ACCEPTED.get_or_init(|| fields.iter().chain(AGENT_KEYS).copied().collect())
}
