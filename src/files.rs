//! Files keyrelay writes about its keys and traffic (the usage file, request logs) are its owner's alone: files
//! are created 0600 and directories 0700.

use std::fs::File;
use std::io;
use std::path::Path;

/// Creates `dir` and its missing parents, each owner-only.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates a new file that nobody but the owner can read; fails if it exists.
pub fn create_new(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Writes `bytes` to a new owner-only file at `path`; on failure no file is left behind.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let written = create_new(path).and_then(|mut file| io::Write::write_all(&mut file, bytes));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}
