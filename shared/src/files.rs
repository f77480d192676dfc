//! Writing key material and state files: whole or not at all, with the
//! permissions set from the first byte (no window where a private key is
//! world-readable).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Write `data` to `path` through a temporary file, fsync, then rename.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// A 32-byte secret kept in `path` (mode 0600), created on first use:
/// `(secret, created)`. A file of another size is `InvalidData`, never
/// replaced.
pub fn load_or_create_secret(path: &Path) -> io::Result<([u8; 32], bool)> {
    match fs::read(path) {
        Ok(raw) => raw.try_into().map(|k| (k, false)).map_err(|raw: Vec<u8>| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {} bytes, not a 32-byte secret",
                    path.display(),
                    raw.len()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let secret: [u8; 32] = rand::random();
            write_atomic(path, &secret, 0o600)?;
            Ok((secret, true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("cg-secret-{}", std::process::id()));
        let path = dir.join("sub/key");
        let (a, created) = load_or_create_secret(&path).unwrap();
        assert!(created);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create_secret(&path).unwrap(), (a, false));
        fs::write(&path, b"short").unwrap();
        let e = load_or_create_secret(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(fs::read(&path).unwrap(), b"short", "never replaced");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_with_mode_and_replaces() {
        let dir = std::env::temp_dir().join(format!("cg-files-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!p.with_extension("tmp").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
