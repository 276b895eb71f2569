//! [`Payload`] for `()`, `Option`, `Box`, `Vec`, tuples and `String`-keyed maps.

use std::collections::{BTreeMap, HashMap};

use super::{Decoder, Encoder, Node, Payload};
use crate::error::{Error, Result};

impl Payload for () {
    fn encode(&self, _: &mut Encoder) -> Result<Node> {
        Ok(Node::Unit)
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        match node {
            Node::Unit => Ok(()),
            other => Err(dec.mismatch("()", &other)),
        }
    }
    fn alias(&self) -> Result<Self> {
        Ok(())
    }
}

impl<P: Payload> Payload for Option<P> {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        Ok(Node::Opt(match self {
            Some(p) => Some(Box::new(p.encode(enc)?)),
            None => None,
        }))
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        match node {
            Node::Opt(Some(inner)) => P::decode(*inner, dec).map(Some),
            Node::Opt(None) => Ok(None),
            other => Err(dec.mismatch("an Option", &other)),
        }
    }
    fn alias(&self) -> Result<Self> {
        self.as_ref().map(P::alias).transpose()
    }
}

impl<P: Payload> Payload for Box<P> {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        (**self).encode(enc)
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        P::decode(node, dec).map(Box::new)
    }
    fn alias(&self) -> Result<Self> {
        (**self).alias().map(Box::new)
    }
}

impl<P: Payload> Payload for Vec<P> {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        let mut nodes = Vec::with_capacity(self.len());
        for (i, item) in self.iter().enumerate() {
            nodes.push(enc.index(i, |enc| item.encode(enc))?);
        }
        Ok(Node::Seq(nodes))
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let Node::Seq(nodes) = node else {
            return Err(dec.mismatch("a sequence", &node));
        };
        nodes.into_iter().enumerate().map(|(i, n)| dec.index(i, |dec| P::decode(n, dec))).collect()
    }
    fn alias(&self) -> Result<Self> {
        self.iter().map(P::alias).collect()
    }
}

/// Encodes `(key, value)` pairs as a [`Node::Map`].
fn encode_entries<'a, P: Payload>(
    enc: &mut Encoder,
    entries: impl Iterator<Item = (&'a String, &'a P)>,
) -> Result<Node> {
    let mut nodes = Vec::new();
    for (k, v) in entries {
        nodes.push((k.clone(), enc.key(k, |enc| v.encode(enc))?));
    }
    Ok(Node::Map(nodes))
}

/// Decodes a [`Node::Map`] into any map type.
fn decode_entries<P: Payload, M: FromIterator<(String, P)>>(node: Node, dec: &mut Decoder) -> Result<M> {
    let Node::Map(nodes) = node else {
        return Err(dec.mismatch("a map", &node));
    };
    nodes
        .into_iter()
        .map(|(k, n)| {
            let v = dec.key(&k, |dec| P::decode(n, dec))?;
            Ok((k, v))
        })
        .collect()
}

impl<P: Payload> Payload for HashMap<String, P> {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        encode_entries(enc, self.iter())
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let Node::Map(nodes) = node else {
            return Err(dec.mismatch("a map", &node));
        };
        // Sized once (collecting through `Result` cannot reserve, so the table grew and
        // rehashed several times for a state dict).
        let mut map = HashMap::with_capacity(nodes.len());
        for (k, n) in nodes {
            let v = dec.key(&k, |dec| P::decode(n, dec))?;
            map.insert(k, v);
        }
        Ok(map)
    }
    fn alias(&self) -> Result<Self> {
        self.iter().map(|(k, v)| Ok((k.clone(), v.alias()?))).collect()
    }
}

impl<P: Payload> Payload for BTreeMap<String, P> {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        encode_entries(enc, self.iter())
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        decode_entries(node, dec)
    }
    fn alias(&self) -> Result<Self> {
        self.iter().map(|(k, v)| Ok((k.clone(), v.alias()?))).collect()
    }
}

/// Takes exactly `n` nodes of a sequence (a tuple's elements).
pub(crate) fn expect_seq(node: Node, n: usize, dec: &Decoder) -> Result<std::vec::IntoIter<Node>> {
    match node {
        Node::Seq(nodes) if nodes.len() == n => Ok(nodes.into_iter()),
        Node::Seq(nodes) => Err(Error::Protocol(format!("{}: expected {n} elements, got {}", dec.path(), nodes.len()))),
        other => Err(dec.mismatch("a tuple", &other)),
    }
}

macro_rules! tuple_payload {
    ($n:expr; $($name:ident $idx:tt),+) => {
        impl<$($name: Payload),+> Payload for ($($name,)+) {
            fn encode(&self, enc: &mut Encoder) -> Result<Node> {
                // Tuple positions read as fields in paths: `pair.1`.
                Ok(Node::Seq(vec![$(enc.field(stringify!($idx), |enc| self.$idx.encode(enc))?),+]))
            }
            fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
                let mut nodes = expect_seq(node, $n, dec)?;
                Ok(($({
                    let n = nodes.next().unwrap_or(Node::Unit);
                    dec.field(stringify!($idx), |dec| $name::decode(n, dec))?
                },)+))
            }
            fn alias(&self) -> Result<Self> {
                Ok(($(self.$idx.alias()?,)+))
            }
        }
    };
}

tuple_payload!(1; A 0);
tuple_payload!(2; A 0, B 1);
tuple_payload!(3; A 0, B 1, C 2);
tuple_payload!(4; A 0, B 1, C 2, D 3);
tuple_payload!(5; A 0, B 1, C 2, D 3, E 4);
tuple_payload!(6; A 0, B 1, C 2, D 3, E 4, F 5);
tuple_payload!(7; A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_payload!(8; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
