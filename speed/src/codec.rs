//! A small, stable binary encoding for entity state: varints, zig-zag integers, raw floats.

/// Appends values to a buffer.
#[derive(Default)]
pub struct Writer {
    /// The bytes written.
    pub buf: Vec<u8>,
}

impl Writer {
    /// A writer whose buffer holds `n` bytes before it grows.
    pub fn with_capacity(n: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    /// An unsigned varint.
    pub fn u(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    /// A signed integer, zig-zag encoded.
    pub fn i(&mut self, v: i64) {
        self.u(((v << 1) ^ (v >> 63)) as u64);
    }
    /// A float, 8 bytes little-endian.
    pub fn f(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Length-prefixed UTF-8.
    pub fn s(&mut self, v: &str) {
        self.u(v.len() as u64);
        self.buf.extend_from_slice(v.as_bytes());
    }
    /// A presence flag.
    pub fn b(&mut self, v: bool) {
        self.buf.push(v as u8);
    }
}

/// Reads values written by [`Writer`]; every read fails cleanly on truncated or bad input.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt state at byte {0}")]
pub struct Corrupt(pub usize);

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    /// True when everything was read.
    pub fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
    /// An unsigned varint.
    pub fn u(&mut self) -> Result<u64, Corrupt> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or(Corrupt(self.pos))?;
            self.pos += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(Corrupt(self.pos))
    }
    /// A zig-zag integer.
    pub fn i(&mut self) -> Result<i64, Corrupt> {
        let v = self.u()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    /// A float.
    pub fn f(&mut self) -> Result<f64, Corrupt> {
        let bytes = self.bytes(8)?;
        Ok(f64::from_le_bytes(bytes.try_into().expect("eight bytes")))
    }
    /// Length-prefixed UTF-8.
    pub fn s<T: for<'s> From<&'s str>>(&mut self) -> Result<T, Corrupt> {
        let n = self.u()? as usize;
        let bytes = self.bytes(n)?;
        std::str::from_utf8(bytes)
            .map(T::from)
            .map_err(|_| Corrupt(self.pos))
    }
    /// A presence flag.
    pub fn b(&mut self) -> Result<bool, Corrupt> {
        let v = *self.buf.get(self.pos).ok_or(Corrupt(self.pos))?;
        self.pos += 1;
        match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Corrupt(self.pos - 1)),
        }
    }
    /// A count bounded by what remains (so corrupt lengths cannot allocate wildly).
    pub fn count(&mut self) -> Result<usize, Corrupt> {
        let n = self.u()? as usize;
        if n > self.buf.len() - self.pos {
            return Err(Corrupt(self.pos));
        }
        Ok(n)
    }
    /// The next `n` bytes, as they are.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let out = self
            .buf
            .get(self.pos..self.pos.checked_add(n).ok_or(Corrupt(self.pos))?)
            .ok_or(Corrupt(self.pos))?;
        self.pos += n;
        Ok(out)
    }
    /// How far into the buffer reading has come.
    pub fn position(&self) -> usize {
        self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let mut w = Writer::default();
        w.u(300);
        w.i(-5);
        w.i(i64::MIN);
        w.f(1.5);
        w.s("héllo");
        w.b(true);
        let mut r = Reader::new(&w.buf);
        assert_eq!(
            (r.u(), r.i(), r.i(), r.f(), r.s::<String>(), r.b()),
            (
                Ok(300),
                Ok(-5),
                Ok(i64::MIN),
                Ok(1.5),
                Ok("héllo".into()),
                Ok(true)
            )
        );
        assert!(r.done());
        let mut r = Reader::new(&w.buf[..3]);
        assert!(r.u().is_ok() && r.i().is_ok() && r.i().is_err());
    }
}
