//! The disk tier's file format. One file per entry, written under a temporary name and renamed
//! only once complete:
//!
//! ```text
//! prefix  magic "TRLSCCH1" | header_len u32 | body_len u64 | header_crc u32     (24 bytes)
//! header  key, resource, status, headers, lifetime, initial age, Vary names, tags
//! body    blocks of at most 64 KiB, each followed by its CRC-32
//! ```
//!
//! A reader trusts nothing: the file's length must be the one its prefix implies (a file cut
//! short by a full disk or a crash is refused before anything is sent), the header's checksum
//! and its key must match, and every body block is checked before it is handed on, so a byte
//! flipped on disk is never served. All integers are little-endian.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::super::store::Entry;

const MAGIC: [u8; 8] = *b"TRLSCCH1";
pub const PREFIX: u64 = 24;
/// Body bytes per checksummed block.
pub const BLOCK: usize = 64 * 1024;
/// Largest header section a reader accepts (a corrupted length must not allocate gigabytes).
const MAX_HEADER: u32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("corrupt cache file: {0}")]
    Corrupt(&'static str),
}

/// The header section, decoded: what the index does not keep in memory.
pub struct Head {
    pub key: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub lifetime: Duration,
    pub initial_age: Duration,
    pub vary: Vec<String>,
}

/// A file opened and checked up to its body: the first block is read and verified.
pub struct Opened {
    pub head: Head,
    pub file: File,
    pub body_len: u64,
    /// The first block's data (verified); the file is positioned after it.
    pub first: Bytes,
}

/// The length of a file holding `header_len` bytes of header and `body_len` of body.
pub fn file_len(header_len: u64, body_len: u64) -> u64 {
    PREFIX + header_len + body_len + 4 * body_len.div_ceil(BLOCK as u64)
}

/// The header section of `e` stored under `key`.
pub fn encode_head(key: &str, e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + key.len() + e.resource.len());
    put_str(&mut out, key);
    put_str(&mut out, &e.resource);
    out.extend_from_slice(&e.status.as_u16().to_le_bytes());
    put_len(&mut out, e.headers.len());
    for (k, v) in e.headers.iter() {
        put_str(&mut out, k.as_str());
        put_bytes(&mut out, v.as_bytes());
    }
    out.extend_from_slice(&nanos(e.lifetime).to_le_bytes());
    out.extend_from_slice(&nanos(e.initial_age).to_le_bytes());
    put_len(&mut out, e.vary.len());
    for v in e.vary.iter() {
        put_str(&mut out, v);
    }
    put_len(&mut out, e.tags.len());
    for t in &e.tags {
        put_str(&mut out, t);
    }
    out
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

/// Reads the header section; every length is checked against what is left.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if n > self.0.len() {
            return Err(ReadError::Corrupt("header field past its end"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len(&mut self) -> Result<usize, ReadError> {
        usize::try_from(u32::from_le_bytes(self.array()?))
            .map_err(|_| ReadError::Corrupt("length out of range"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], ReadError> {
        let n = self.len()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, ReadError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| ReadError::Corrupt("text is not UTF-8"))
    }

    fn duration(&mut self) -> Result<Duration, ReadError> {
        Ok(Duration::from_nanos(u64::from_le_bytes(self.array()?)))
    }

    fn strings(&mut self) -> Result<Vec<String>, ReadError> {
        let n = self.len()?;
        (0..n).map(|_| self.string()).collect()
    }
}

pub fn decode_head(b: &[u8]) -> Result<Head, ReadError> {
    let mut c = Cursor(b);
    let key = c.string()?;
    let _resource = c.bytes()?;
    let status = StatusCode::from_u16(u16::from_le_bytes(c.array()?))
        .map_err(|_| ReadError::Corrupt("bad status"))?;
    let count = c.len()?;
    let mut headers = HeaderMap::with_capacity(count.min(256));
    for _ in 0..count {
        let name = HeaderName::from_bytes(c.bytes()?)
            .map_err(|_| ReadError::Corrupt("bad header name"))?;
        let value = HeaderValue::from_bytes(c.bytes()?)
            .map_err(|_| ReadError::Corrupt("bad header value"))?;
        headers.append(name, value);
    }
    let lifetime = c.duration()?;
    let initial_age = c.duration()?;
    let vary = c.strings()?;
    let _tags = c.strings()?;
    if !c.0.is_empty() {
        return Err(ReadError::Corrupt("trailing bytes after the header"));
    }
    Ok(Head {
        key,
        status,
        headers,
        lifetime,
        initial_age,
        vary,
    })
}

/// Writes one entry's file under a temporary name; [`FileWriter::commit`] renames it. Dropped
/// before that (an error, a body cut short), the temporary file is removed.
pub struct FileWriter {
    file: BufWriter<File>,
    tmp: PathBuf,
    header_len: u32,
    header_crc: u32,
    body_len: u64,
    block: Vec<u8>,
    /// Bytes written to the file so far.
    pub written: u64,
    done: bool,
}

impl FileWriter {
    pub fn create(tmp: PathBuf, head: &[u8]) -> io::Result<Self> {
        let header_len = u32::try_from(head.len())
            .ok()
            .filter(|n| *n <= MAX_HEADER)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "header too large"))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut w = Self {
            file: BufWriter::with_capacity(BLOCK + 4, file),
            tmp,
            header_len,
            header_crc: crc32fast::hash(head),
            body_len: 0,
            block: Vec::with_capacity(BLOCK),
            written: 0,
            done: false,
        };
        // The real prefix is written at the end, once the body's length is known: until then
        // the magic is zeros, so a file left half-written is never taken for a whole one.
        w.write(&[0; PREFIX as usize])?;
        w.write(head)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.file.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    pub fn body(&mut self, mut chunk: &[u8]) -> io::Result<()> {
        while !chunk.is_empty() {
            let n = (BLOCK - self.block.len()).min(chunk.len());
            self.block.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            self.body_len += n as u64;
            if self.block.len() == BLOCK {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.block);
        self.write(&block)?;
        self.write(&crc32fast::hash(&block).to_le_bytes())?;
        self.block = block;
        self.block.clear();
        Ok(())
    }

    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// Complete the file and rename it to `path`; its length.
    pub fn commit(mut self, path: &Path) -> io::Result<u64> {
        self.flush_block()?;
        let mut prefix = Vec::with_capacity(PREFIX as usize);
        prefix.extend_from_slice(&MAGIC);
        prefix.extend_from_slice(&self.header_len.to_le_bytes());
        prefix.extend_from_slice(&self.body_len.to_le_bytes());
        prefix.extend_from_slice(&self.header_crc.to_le_bytes());
        self.file.flush()?;
        let file = self.file.get_mut();
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&prefix)?;
        // No fsync: the tier is emptied at every start, so a file need not survive a crash,
        // and one a crash cut short fails its length check.
        std::fs::rename(&self.tmp, path)?;
        self.done = true;
        Ok(self.written)
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Open the file at `path`, expected `len` bytes long and holding `key`, and check it up to
/// its first body block.
pub fn open(path: &Path, len: u64, key: &str) -> Result<Opened, ReadError> {
    let mut file = File::open(path)?;
    if file.metadata()?.len() != len {
        return Err(ReadError::Corrupt("length differs from the index"));
    }
    let mut prefix = [0u8; PREFIX as usize];
    file.read_exact(&mut prefix)?;
    let field = |r: std::ops::Range<usize>| prefix.get(r).unwrap_or_default();
    if field(0..8) != MAGIC {
        return Err(ReadError::Corrupt("bad magic"));
    }
    let header_len = u32::from_le_bytes(field(8..12).try_into().unwrap_or_default());
    let body_len = u64::from_le_bytes(field(12..20).try_into().unwrap_or_default());
    let header_crc = u32::from_le_bytes(field(20..24).try_into().unwrap_or_default());
    if header_len > MAX_HEADER || file_len(u64::from(header_len), body_len) != len {
        return Err(ReadError::Corrupt("length differs from the prefix"));
    }
    let mut head = vec![0; header_len as usize];
    file.read_exact(&mut head)?;
    if crc32fast::hash(&head) != header_crc {
        return Err(ReadError::Corrupt("header checksum"));
    }
    let head = decode_head(&head)?;
    if head.key != key {
        return Err(ReadError::Corrupt("another key's file"));
    }
    let first = read_blocks(&mut file, body_len, 1)?;
    Ok(Opened {
        head,
        file,
        body_len,
        first,
    })
}

/// Read and check up to `blocks` blocks of the `remaining` body bytes.
pub fn read_blocks(file: &mut File, remaining: u64, blocks: usize) -> Result<Bytes, ReadError> {
    let want = usize::try_from(remaining.min((blocks * BLOCK) as u64)).unwrap_or(BLOCK);
    let mut out = BytesMut::with_capacity(want);
    let mut block = vec![0u8; BLOCK + 4];
    let mut left = want;
    while left > 0 {
        let n = left.min(BLOCK);
        let buf = &mut block[..n + 4];
        file.read_exact(buf)?;
        let (data, crc) = buf.split_at(n);
        if crc32fast::hash(data).to_le_bytes() != crc {
            return Err(ReadError::Corrupt("body block checksum"));
        }
        out.extend_from_slice(data);
        left -= n;
    }
    Ok(out.freeze())
}

/// Set once `preadv2` with `RWF_NOWAIT` has been refused as such (an old kernel, a file system
/// without it): every read then goes to the blocking pool without trying.
static NOWAIT_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// [`read_blocks`] without waiting for the disk: only when the page cache holds the whole span
/// (`preadv2` with `RWF_NOWAIT`), so that a hot file is served on the runtime thread without a
/// trip to the blocking pool and back (about 40 % of a disk hit's CPU was those hand-offs:
/// docs/caching.md). `None`, the file's position unchanged, when it does not hold all of it
/// or the kernel or file system cannot say (`EAGAIN`, `EOPNOTSUPP`): the caller reads on the
/// blocking pool as before. Every block is checked the same way.
pub fn read_blocks_cached(
    file: &mut File,
    remaining: u64,
    blocks: usize,
) -> Result<Option<Bytes>, ReadError> {
    if NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let want = usize::try_from(remaining.min((blocks * BLOCK) as u64)).unwrap_or(BLOCK);
    let span = want + 4 * want.div_ceil(BLOCK);
    let mut raw = BytesMut::zeroed(span);
    let pos = file.stream_position()?;
    let read = rustix::io::preadv2(
        &*file,
        &mut [io::IoSliceMut::new(&mut raw[..])],
        pos,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    match read {
        Ok(n) if n == span => {}
        // The kernel or the file system cannot read without waiting: not worth a buffer
        // per read again.
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            NOWAIT_UNSUPPORTED.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        _ => return Ok(None),
    }
    file.seek(SeekFrom::Current(span as i64))?;
    // Check each block, then move its data over the checksums before it, in place.
    let mut end = 0;
    for start in (0..span).step_by(BLOCK + 4) {
        let n = (span - start - 4).min(BLOCK);
        let (data, crc) = raw[start..start + n + 4].split_at(n);
        if crc32fast::hash(data).to_le_bytes() != crc {
            return Err(ReadError::Corrupt("body block checksum"));
        }
        raw.copy_within(start..start + n, end);
        end += n;
    }
    raw.truncate(end);
    Ok(Some(raw.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn entry() -> Entry {
        let mut h = HeaderMap::new();
        h.insert("cache-control", "max-age=60".parse().unwrap());
        h.append("x-two", "a".parse().unwrap());
        h.append("x-two", "b".parse().unwrap());
        Entry {
            status: StatusCode::NOT_FOUND,
            cc: Default::default(),
            headers: crate::cache::fields::Fields::of(&h),
            body: Bytes::new(),
            lifetime: Duration::from_millis(60_500),
            initial_age: Duration::from_secs(3),
            stored: Instant::now(),
            fetched: Instant::now(),
            resource: crate::cache::key::Resource::whole("h\0/a"),
            tags: vec!["t1".into()],
            vary: Arc::from(["accept".to_string()]),
            disk: None,
        }
    }

    fn write(dir: &Path, key: &str, body: &[u8]) -> (PathBuf, u64) {
        let path = dir.join("f");
        let mut w = FileWriter::create(dir.join("tmp"), &encode_head(key, &entry())).unwrap();
        for c in body.chunks(10_000) {
            w.body(c).unwrap();
        }
        let len = w.commit(&path).unwrap();
        (path, len)
    }

    fn body(mut o: Opened) -> Vec<u8> {
        let mut out = o.first.to_vec();
        let mut left = o.body_len - o.first.len() as u64;
        while left > 0 {
            let b = read_blocks(&mut o.file, left, 3).unwrap();
            left -= b.len() as u64;
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn an_entry_round_trips_block_by_block() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (path, len) = write(dir.path(), "k", &data);
        assert_eq!(len, std::fs::metadata(&path).unwrap().len());
        assert!(!dir.path().join("tmp").exists(), "renamed");
        let o = open(&path, len, "k").unwrap();
        assert_eq!(o.head.status, StatusCode::NOT_FOUND);
        assert_eq!(o.head.headers.get_all("x-two").iter().count(), 2);
        assert_eq!(o.head.lifetime, Duration::from_millis(60_500));
        assert_eq!(o.head.vary, ["accept"]);
        assert_eq!(body(o), data);
        // Empty bodies too.
        let (path, len) = write(dir.path(), "e", b"");
        std::fs::rename(&path, dir.path().join("e")).unwrap();
        let o = open(&dir.path().join("e"), len, "e").unwrap();
        assert_eq!((o.body_len, o.first.len()), (0, 0));
    }

    /// The page-cache read gives what the blocking read gives, block for block, and checks
    /// every block the same way; where the file system cannot read without waiting it answers
    /// `None` and nothing else.
    #[test]
    fn cached_reads_match_blocking_reads_and_check_every_block() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let (path, len) = write(dir.path(), "k", &data);
        let mut o = open(&path, len, "k").unwrap();
        let mut out = o.first.to_vec();
        let mut left = o.body_len - o.first.len() as u64;
        let mut cached = 0;
        while left > 0 {
            let b = match read_blocks_cached(&mut o.file, left, 2).unwrap() {
                Some(b) => {
                    cached += 1;
                    b
                }
                None => read_blocks(&mut o.file, left, 2).unwrap(),
            };
            assert!(!b.is_empty() && b.len() <= 2 * BLOCK);
            left -= b.len() as u64;
            out.extend_from_slice(&b);
        }
        assert_eq!(out, data);
        // Whether the file system reads without waiting (ext4 does; some overlay file systems
        // answer EOPNOTSUPP): either way the bytes must be the same.
        eprintln!("{cached} reads from the page cache without waiting");
        // A byte flipped in the last block: the cached read refuses it (or cannot tell).
        let mut raw = std::fs::read(&path).unwrap();
        let at = raw.len() - 100;
        raw[at] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        let mut o = open(&path, len, "k").unwrap();
        // Past the three full blocks after the first, to the last (partial) one.
        let left = o.body_len - o.first.len() as u64;
        assert!(read_blocks(&mut o.file, left, 3).is_ok());
        let r = read_blocks_cached(&mut o.file, left - 3 * BLOCK as u64, 1);
        assert!(
            matches!(r, Ok(None) | Err(ReadError::Corrupt("body block checksum"))),
            "{r:?}"
        );
    }

    #[test]
    fn truncated_flipped_foreign_or_half_written_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 200_000];
        let (path, len) = write(dir.path(), "k", &data);
        let corrupt = |r: Result<Opened, ReadError>| matches!(r, Err(ReadError::Corrupt(_)));
        assert!(corrupt(open(&path, len, "other")), "another key");
        assert!(corrupt(open(&path, len + 1, "k")), "index disagrees");
        // A byte flipped in the third block: opening succeeds (first block fine), reading
        // that block fails.
        let mut raw = std::fs::read(&path).unwrap();
        let at = raw.len() - 1000;
        raw[at] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        let mut o = open(&path, len, "k").unwrap();
        let r = read_blocks(&mut o.file, o.body_len - BLOCK as u64, 4);
        assert!(matches!(r, Err(ReadError::Corrupt("body block checksum"))));
        // Truncated: refused before any byte of body.
        raw.truncate(raw.len() / 2);
        std::fs::write(&path, &raw).unwrap();
        let short = raw.len() as u64;
        assert!(corrupt(open(&path, short, "k")));
        // A header byte flipped.
        let (path, len) = write(dir.path(), "k", b"x");
        let mut raw = std::fs::read(&path).unwrap();
        raw[PREFIX as usize + 2] ^= 0x40;
        std::fs::write(&path, &raw).unwrap();
        assert!(corrupt(open(&path, len, "k")));
        // Half-written (the prefix is written last): never valid.
        let mut w = FileWriter::create(dir.path().join("half"), b"h").unwrap();
        w.body(b"abc").unwrap();
        w.file.flush().unwrap();
        let half = dir.path().join("half");
        let n = std::fs::metadata(&half).unwrap().len();
        assert!(corrupt(open(&half, n, "k")));
        drop(w);
        assert!(!half.exists(), "an abandoned write leaves no file");
    }
}
