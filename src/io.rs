//! File output that survives a crash or a full disk: every file distill writes goes to a temporary file in
//! the same folder first and is renamed over the target only once complete, so a reader sees the old file or
//! the new one, never half of one.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The hidden name next to `path` that a file is written under before it is renamed to `path`. The file name
/// keeps its extension at the end, for writers that choose the format by it (plotters' PNG encoder).
pub fn partial_path(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".partial-{}-{name}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (write, flush to disk, rename). On any error the target is untouched
/// and no partial file is left behind.
///
/// ```
/// let dir = distill::io::TempDir::new()?;
/// distill::io::write_atomic(dir.path().join("notes.txt"), b"pruned to 90%")?;
/// assert_eq!(std::fs::read(dir.path().join("notes.txt")).unwrap(), b"pruned to 90%");
/// # Ok::<(), distill::Error>(())
/// ```
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Like [`write_atomic`], with `fill` writing the content to the file.
pub fn write_atomic_with(path: impl AsRef<Path>, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let path = path.as_ref();
    let tmp = partial_path(path);
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        fill(&mut file)?;
        file.flush()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    commit_atomic(&tmp, path)
}

/// Makes `path` atomically from a file another writer produced at `tmp` (e.g. libtorch's safetensors writer):
/// syncs it and renames it into place, removing it on error.
pub fn commit_atomic(tmp: impl AsRef<Path>, path: impl AsRef<Path>) -> Result<()> {
    let (tmp, path) = (tmp.as_ref(), path.as_ref());
    let result = std::fs::File::open(tmp).and_then(|f| f.sync_all()).and_then(|_| std::fs::rename(tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// A fresh folder under the system's temporary folder, removed with everything in it when dropped; for tests
/// and examples.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates the folder.
    pub fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = std::env::temp_dir().join(format!("distill-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        Ok(TempDir { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_nothing_on_error() {
        let dir = TempDir::new().unwrap();
        let target = dir.path().join("a.txt");
        write_atomic(&target, b"first").unwrap();
        write_atomic(&target, b"second").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        let err = write_atomic_with(&target, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"second", "the old content survives a failed write");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no partial file left: {names:?}");
        assert!(write_atomic(dir.path().join("missing/x.txt"), b"x").is_err());
        let kept = dir.path().to_path_buf();
        drop(dir);
        assert!(!kept.exists());
    }
}
