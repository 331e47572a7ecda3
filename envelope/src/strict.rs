//! Holds a body to the MessagePack types the spec names, nothing looser.
//!
//! serde and rmp-serde are generous: a `String` takes a `bin` holding UTF-8, a byte field
//! takes a `str` or an array of small integers, a struct takes an array (its fields by
//! position) and maps keyed by field *numbers*, an enum takes its variant's index, and an
//! `Option` takes `nil`. No conforming signer writes any of these, and a verifier written in
//! another language from `docs/wire-format.md` would refuse them; accepting them would let
//! two verifiers disagree on the same frame. [`Strict`] wraps the deserializer so that each
//! value must have exactly the family its Rust type asks for:
//!
//! | asked for | accepted MessagePack |
//! |-----------|----------------------|
//! | integer | any integer format (values out of range are refused by the type) |
//! | `bool` | `true`, `false` |
//! | string, identifier, map key, enum | `str` |
//! | bytes (`Uuid`, `serde_bytes`) | `bin` |
//! | sequence | array |
//! | struct, map | map |
//! | `Option` | the inner type; `nil` is refused (absent keys are omitted) |
//!
//! Anything else (`nil`, floats, `ext`) is refused everywhere. One hole remains at this
//! level: rmp-serde hands a `str` whose bytes are not UTF-8 to a visitor as bytes, exactly
//! like a `bin`, so [`check_utf8`] walks the decoded body once more to refuse it.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};

/// A deserializer that accepts only the MessagePack family each type asks for.
pub(crate) struct Strict<D>(pub(crate) D);

/// The family a [`Expect`] visitor lets through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Bool,
    Int,
    Str,
    Bin,
    Array,
    Map,
}

/// Forwards to `inner` only the visits of its family; every other visit is serde's
/// default, an "invalid type" error naming what `inner` expected.
struct Expect<V> {
    family: Family,
    inner: V,
}

impl<V> Expect<V> {
    fn new(family: Family, inner: V) -> Self {
        Self { family, inner }
    }
}

impl<'de, V: Visitor<'de>> Expect<V> {
    fn allows<E: de::Error>(&self, family: Family, got: de::Unexpected<'_>) -> Result<(), E> {
        if self.family == family { Ok(()) } else { Err(E::invalid_type(got, self)) }
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Expect<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<V::Value, E> {
        self.allows(Family::Bool, de::Unexpected::Bool(v))?;
        self.inner.visit_bool(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<V::Value, E> {
        self.allows(Family::Int, de::Unexpected::Signed(v))?;
        self.inner.visit_i64(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<V::Value, E> {
        self.allows(Family::Int, de::Unexpected::Unsigned(v))?;
        self.inner.visit_u64(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.allows(Family::Str, de::Unexpected::Str(v))?;
        self.inner.visit_str(v)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.allows(Family::Str, de::Unexpected::Str(v))?;
        self.inner.visit_borrowed_str(v)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        self.allows(Family::Str, de::Unexpected::Str(&v))?;
        self.inner.visit_string(v)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
        self.allows(Family::Bin, de::Unexpected::Bytes(v))?;
        self.inner.visit_bytes(v)
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
        self.allows(Family::Bin, de::Unexpected::Bytes(v))?;
        self.inner.visit_borrowed_bytes(v)
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
        self.allows(Family::Bin, de::Unexpected::Bytes(&v))?;
        self.inner.visit_byte_buf(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.allows(Family::Array, de::Unexpected::Seq)?;
        self.inner.visit_seq(StrictSeq(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.allows(Family::Map, de::Unexpected::Map)?;
        self.inner.visit_map(StrictMap(map))
    }
}

/// An `Option`: a present value is decoded strictly, `nil` is refused.
struct Present<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for Present<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        Err(E::custom("nil for an optional key (an absent key is left out, never nil)"))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(Strict(d))
    }
}

/// An enum of unit variants (such as `Status`), written as its variant's name.
struct VariantName<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for VariantName<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.0.visit_enum(v.into_deserializer())
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.0.visit_enum(de::value::BorrowedStrDeserializer::new(v))
    }
}

struct StrictSeq<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for StrictSeq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(StrictSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

struct StrictMap<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StrictMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(StrictSeed(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(StrictSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

struct StrictSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for StrictSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Strict(d))
    }
}

/// Refuses a type the wire never carries.
fn unsupported<E: de::Error>(what: &str) -> E {
    E::custom(format_args!("{what} never appears in an envelope body"))
}

macro_rules! ints {
    ($($method:ident),+) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.$method(Expect::new(Family::Int, v))
        }
    )+};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    ints!(
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64
    );

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("a value of no fixed type"))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_bool(Expect::new(Family::Bool, v))
    }

    fn deserialize_f32<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("a float"))
    }

    fn deserialize_f64<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("a float"))
    }

    fn deserialize_char<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("a char"))
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_str(Expect::new(Family::Str, v))
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_string(Expect::new(Family::Str, v))
    }

    // `deserialize_any`, not `deserialize_bytes`: rmp-serde gives a `bin` to the latter as a
    // sequence of integers when the visitor asks for a sequence, and `any` keeps it a `bin`.
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Expect::new(Family::Bin, v))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Expect::new(Family::Bin, v))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_option(Present(v))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("nil"))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("nil"))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, D::Error> {
        v.visit_newtype_struct(self)
    }

    // `any` again: rmp-serde's `deserialize_seq` also reads a `bin` as a sequence.
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Expect::new(Family::Array, v))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("a tuple"))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _: &'static str, _: usize, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("a tuple"))
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Expect::new(Family::Map, v))
    }

    // A map only: not the positional (array) form serde would also accept.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Expect::new(Family::Map, v))
    }

    // A variant name only: not its index, nor a one-entry map.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_str(Expect::new(Family::Str, VariantName(v)))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_identifier(Expect::new(Family::Str, v))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(unsupported("an ignored value"))
    }
}

/// Checks that every `str` in the MessagePack value at the start of `bytes` is UTF-8.
/// Called on a body that already decoded strictly, so it holds nothing but maps, arrays,
/// `str`, `bin`, integers and booleans. The walk counts the values still to read instead of
/// recursing, so nesting costs no stack.
pub(crate) fn check_utf8(bytes: &[u8]) -> Result<(), String> {
    use rmp::Marker;
    let mut rd = Reader(bytes);
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let [m] = rd.take(1)? else { unreachable!("took one byte") };
        match Marker::from_u8(*m) {
            Marker::FixStr(n) => rd.str(usize::from(n))?,
            Marker::Str8 => rd.str_of(1)?,
            Marker::Str16 => rd.str_of(2)?,
            Marker::Str32 => rd.str_of(4)?,
            Marker::Bin8 => rd.skip_of(1)?,
            Marker::Bin16 => rd.skip_of(2)?,
            Marker::Bin32 => rd.skip_of(4)?,
            Marker::FixArray(n) => pending += u64::from(n),
            Marker::Array16 => pending += rd.len(2)?,
            Marker::Array32 => pending += rd.len(4)?,
            Marker::FixMap(n) => pending += 2 * u64::from(n),
            Marker::Map16 => pending += 2 * rd.len(2)?,
            Marker::Map32 => pending += 2 * rd.len(4)?,
            Marker::U8 | Marker::I8 => _ = rd.take(1)?,
            Marker::U16 | Marker::I16 => _ = rd.take(2)?,
            Marker::U32 | Marker::I32 => _ = rd.take(4)?,
            Marker::U64 | Marker::I64 => _ = rd.take(8)?,
            Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {}
            other => return Err(format!("unexpected MessagePack marker {other:?} in a body")),
        }
    }
    Ok(())
}

/// A cursor over the body for [`check_utf8`].
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let (head, rest) = self.0.split_at_checked(n).ok_or("the body ends inside a value")?;
        self.0 = rest;
        Ok(head)
    }

    /// A big-endian length of `width` bytes.
    fn len(&mut self, width: usize) -> Result<u64, String> {
        Ok(self.take(width)?.iter().fold(0, |acc, b| acc << 8 | u64::from(*b)))
    }

    fn str(&mut self, n: usize) -> Result<(), String> {
        let s = self.take(n)?;
        std::str::from_utf8(s).map(drop).map_err(|e| format!("a str is not UTF-8: {e}"))
    }

    fn str_of(&mut self, width: usize) -> Result<(), String> {
        let n = self.len(width)?;
        self.str(usize::try_from(n).map_err(|_| "a str longer than memory")?)
    }

    fn skip_of(&mut self, width: usize) -> Result<(), String> {
        let n = self.len(width)?;
        self.take(usize::try_from(n).map_err(|_| "a bin longer than memory")?).map(drop)
    }
}
