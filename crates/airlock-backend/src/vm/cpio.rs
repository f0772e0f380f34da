//! A minimal writer of `newc` cpio archives, the format the kernel unpacks
//! as an initramfs. Archives concatenate: the kernel unpacks one after the
//! other, later files replacing earlier ones.

use std::collections::BTreeSet;
use std::io::{self, Write};

/// Writes entries in order; parent directories are emitted once, first.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1000,
            dirs: BTreeSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: usize) -> io::Result<()> {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so archives are reproducible
            size as u32,
            0,
            0,
            0,
            0,
            namesize as u32,
            0,
        ];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(h.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        pad(&mut self.out, 110 + namesize)
    }

    /// A directory and its missing parents (`name` without leading `/`).
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        let mut acc = String::new();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.dirs.insert(acc.clone()) {
                let a = acc.clone();
                self.header(&a, 0o040755, 0)?;
            }
        }
        Ok(())
    }

    /// A regular file (`name` without leading `/`), creating its parents.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.header(name, 0o100000 | (mode & 0o7777), data.len())?;
        self.out.write_all(data)?;
        pad(&mut self.out, data.len())
    }

    /// Write the trailer and return the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn pad<W: Write>(out: &mut W, len: usize) -> io::Result<()> {
    let n = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a/b/c.txt", 0o644, b"hello").unwrap();
        let buf = w.finish().unwrap();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        let s = String::from_utf8_lossy(&buf);
        let a = s.find("a\0").unwrap();
        let ab = s.find("a/b\0").unwrap();
        let f = s.find("a/b/c.txt\0").unwrap();
        assert!(a < ab && ab < f);
        assert!(s.contains("hello"));
        assert!(s.contains("TRAILER!!!\0"));
        // Every header starts on a 4-byte boundary.
        for (i, _) in s.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }
}
