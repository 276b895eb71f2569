//! A reader for Rust `Debug` output, to read the configuration that tch's nn modules keep
//! private (they derive `Debug` but have no getters). tch is pinned (`=0.24.0`), and the
//! tests rebuild every module from what this reads and compare the `Debug` texts.

/// A parsed `Debug` value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Dbg {
    /// `Name { .. }`, `Name( .. )`, `Name[ .. ]`.
    Named(String, Box<Dbg>),
    /// `{ field: value, .. }`.
    Struct(Vec<(String, Dbg)>),
    /// `( .. )`.
    Tuple(Vec<Dbg>),
    /// `[ .. ]`.
    List(Vec<Dbg>),
    /// A number, an identifier, `true`.
    Atom(String),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        match self.peek() {
            Some(x) if x == c => {
                self.i += 1;
                Ok(())
            }
            other => Err(format!("expected {:?} at {}, found {:?}", c as char, self.i, other.map(|b| b as char))),
        }
    }

    fn atom(&mut self) -> String {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() {
            let c = self.s[self.i];
            if c == b':' && self.s.get(self.i + 1) == Some(&b':') {
                self.i += 2; // a path: `a::b`
            } else if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+') {
                self.i += 1;
            } else {
                break;
            }
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn items(&mut self, close: u8) -> Result<Vec<Dbg>, String> {
        let mut items = Vec::new();
        loop {
            if self.peek() == Some(close) {
                self.i += 1;
                return Ok(items);
            }
            items.push(self.value()?);
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(c) if c == close => {}
                other => return Err(format!("expected ',' at {}, found {:?}", self.i, other.map(|b| b as char))),
            }
        }
    }

    fn fields(&mut self) -> Result<Vec<(String, Dbg)>, String> {
        let mut fields = Vec::new();
        loop {
            if self.peek() == Some(b'}') {
                self.i += 1;
                return Ok(fields);
            }
            let name = self.atom();
            if name.is_empty() {
                return Err(format!("expected a field name at {}", self.i));
            }
            self.expect(b':')?;
            fields.push((name, self.value()?));
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {}
                other => return Err(format!("expected ',' at {}, found {:?}", self.i, other.map(|b| b as char))),
            }
        }
    }

    fn group(&mut self) -> Result<Option<Dbg>, String> {
        Ok(match self.peek() {
            Some(b'{') => {
                self.i += 1;
                Some(Dbg::Struct(self.fields()?))
            }
            Some(b'(') => {
                self.i += 1;
                Some(Dbg::Tuple(self.items(b')')?))
            }
            Some(b'[') => {
                self.i += 1;
                Some(Dbg::List(self.items(b']')?))
            }
            _ => None,
        })
    }

    fn value(&mut self) -> Result<Dbg, String> {
        if let Some(group) = self.group()? {
            return Ok(group);
        }
        let atom = self.atom();
        if atom.is_empty() {
            return Err(format!("unexpected {:?} at {}", self.peek().map(|b| b as char), self.i));
        }
        Ok(match self.group()? {
            Some(group) => Dbg::Named(atom, Box::new(group)),
            None => Dbg::Atom(atom),
        })
    }
}

/// Parses the `Debug` text of a value.
pub(crate) fn parse(text: &str) -> Result<Dbg, String> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let v = p.value()?;
    p.ws();
    if p.i != text.len() {
        return Err(format!("trailing text at {}", p.i));
    }
    Ok(v)
}

impl Dbg {
    /// A field of a struct value (named or not).
    pub(crate) fn field(&self, name: &str) -> Result<&Dbg, String> {
        let fields = match self {
            Dbg::Named(_, inner) => return inner.field(name),
            Dbg::Struct(fields) => fields,
            other => return Err(format!("not a struct: {other:?}")),
        };
        fields.iter().find(|(n, _)| n == name).map(|(_, v)| v).ok_or_else(|| format!("no field `{name}`"))
    }

    pub(crate) fn atom(&self) -> Result<&str, String> {
        match self {
            Dbg::Atom(a) => Ok(a),
            other => Err(format!("not a plain value: {other:?}")),
        }
    }

    pub(crate) fn f64(&self) -> Result<f64, String> {
        self.atom()?.parse().map_err(|e| format!("not a number: {e}"))
    }

    pub(crate) fn i64(&self) -> Result<i64, String> {
        self.atom()?.parse().map_err(|e| format!("not an integer: {e}"))
    }

    pub(crate) fn bool(&self) -> Result<bool, String> {
        self.atom()?.parse().map_err(|e| format!("not a bool: {e}"))
    }

    /// An integer, or a list of integers (`1` or `[1, 2]`).
    pub(crate) fn i64s(&self) -> Result<Vec<i64>, String> {
        match self {
            Dbg::List(items) => items.iter().map(Dbg::i64).collect(),
            atom => Ok(vec![atom.i64()?]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_structs_lists_tuples_and_numbers() {
        let v = parse(
            "Conv { ws: Tensor[[8, 3, 3], Float], bs: Some([0.1, -2.5e-7]), x: (1, Zeros), \
             config: ConvConfigND { stride: [1, 2], eps: 1e-5, bias: true, mode: Zeros } }",
        )
        .unwrap();
        let config = v.field("config").unwrap();
        assert_eq!(config.field("stride").unwrap().i64s().unwrap(), vec![1, 2]);
        assert_eq!(config.field("eps").unwrap().f64().unwrap(), 1e-5);
        assert!(config.field("bias").unwrap().bool().unwrap());
        assert_eq!(config.field("mode").unwrap().atom().unwrap(), "Zeros");
        assert!(v.field("nope").is_err());
    }

    #[test]
    fn malformed_text_is_an_error() {
        assert!(parse("Conv { ws: ").is_err());
        assert!(parse("[1, 2").is_err());
    }
}
