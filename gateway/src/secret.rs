//! The node's token secret, kept in the data directory.
//!
//! On first start the gateway writes 32 random bytes, hex-encoded, to
//! `<data dir>/jwt.secret` with mode 0600. The secret is the file's bytes as
//! they are, so `gateway token` and loadgen, run with the same data
//! directory, mint tokens this node accepts. To use a secret shared across a
//! fleet, write the same file on every node before starting it.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use courier_protocol::token::Secret;

/// File name of the secret inside the data directory.
pub const FILE_NAME: &str = "jwt.secret";

/// The path of the secret for `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads an existing secret; a clear error when no node has created one in
/// `data_dir` (a token signed with a fresh secret would be refused by every
/// node).
pub fn load(data_dir: &Path) -> io::Result<Secret> {
    let path = path(data_dir);
    match fs::read(&path) {
        Ok(bytes) if bytes.len() >= 16 => Ok(Secret::new(bytes)),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds fewer than 16 bytes", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no token secret at {}: start the gateway once with this --data-dir, \
                 or pass the node's --data-dir",
                path.display()
            ),
        )),
        Err(e) => Err(e),
    }
}

/// Reads the secret, creating it (and the data directory) if absent.
pub fn load_or_create(data_dir: &Path) -> io::Result<Secret> {
    let path = path(data_dir);
    match fs::read(&path) {
        Ok(bytes) if bytes.len() >= 16 => return Ok(Secret::new(bytes)),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} holds fewer than 16 bytes", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::create_dir_all(data_dir)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(io::Error::other)?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(hex.as_bytes())?;
            f.sync_all()?;
            Ok(Secret::new(hex.into_bytes()))
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Secret::new(fs::read(&path)?)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(&dir.path().join("nested")).unwrap();
        let b = load_or_create(&dir.path().join("nested")).unwrap();
        assert_eq!(format!("{a:?}"), "Secret(HS256)");
        let bytes = fs::read(path(&dir.path().join("nested"))).unwrap();
        assert_eq!(bytes.len(), 64);
        let token = courier_protocol::token::mint(
            &a,
            &courier_protocol::token::claims_for("u", 1, 100, 10),
        );
        assert!(courier_protocol::token::verify(&b, &token, 100).is_ok());
    }
}
