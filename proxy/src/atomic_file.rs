//! Replacing a file that holds secrets (the keys_file) atomically without
//! widening who may read it.
//!
//! [`replace`] writes a temporary file in the target's directory, created
//! with the final mode (the original file's mode and, where the process may,
//! its owner; `new_mode` for a file that does not exist yet), flushes it to
//! disk, renames it over the target and syncs the directory. A crash leaves
//! either the old or the new file, never a half-written one, and the secret
//! is never readable by anyone the original file did not allow.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The mode of a new keys file: owner read/write only.
pub const PRIVATE_MODE: u32 = 0o600;

/// Replace `path` with `contents` atomically, keeping the original file's
/// mode (and owner where possible); a new file gets `new_mode`.
pub fn replace(path: &Path, contents: &[u8], new_mode: u32) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let original = std::fs::metadata(path).ok();
    let (tmp, mut file) = create_temp(&dir, path, mode_of(original.as_ref(), new_mode))?;
    let result = (|| {
        keep_owner(&file, original.as_ref());
        // The umask may have narrowed the mode at creation: set it exactly.
        set_mode(&file, mode_of(original.as_ref(), new_mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // Make the rename durable; a directory that cannot be opened for
        // syncing (some filesystems) is not an error.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok::<(), std::io::Error>(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// Whether a file's mode lets its group or others read or write it.
pub fn readable_by_others(path: &Path) -> Option<u32> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = mode_of(Some(&meta), 0);
    (mode & 0o077 != 0).then_some(mode)
}

fn create_temp(dir: &Path, target: &Path, mode: u32) -> Result<(PathBuf, File), String> {
    let name = target
        .file_name()
        .map_or_else(|| String::from("file"), |n| n.to_string_lossy().into_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for attempt in 0..16u32 {
        let tmp = dir.join(format!(".{name}.{}.{nanos}.{attempt}.tmp", std::process::id()));
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        match opts.open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(format!("cannot create a temporary file in {}: {e}", dir.display())),
        }
    }
    Err(format!(
        "cannot create a temporary file in {}: {}",
        dir.display(),
        last.map_or_else(String::new, |e| e.to_string())
    ))
}

#[cfg(unix)]
fn mode_of(meta: Option<&std::fs::Metadata>, default: u32) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.map_or(default, |m| m.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn mode_of(_meta: Option<&std::fs::Metadata>, default: u32) -> u32 {
    default
}

#[cfg(unix)]
fn set_mode(file: &File, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &File, _mode: u32) -> std::io::Result<()> {
    Ok(())
}

/// Give the temporary file the original's owner and group. Only root may
/// change the owner; a group the user belongs to may still be kept. Failing
/// here is not an error: the mode already keeps the file as private as it
/// was.
#[cfg(unix)]
fn keep_owner(file: &File, original: Option<&std::fs::Metadata>) {
    use std::os::unix::fs::MetadataExt;
    let Some(m) = original else { return };
    if std::os::unix::fs::fchown(file, Some(m.uid()), Some(m.gid())).is_err() {
        let _ = std::os::unix::fs::fchown(file, None, Some(m.gid()));
    }
}

#[cfg(not(unix))]
fn keep_owner(_file: &File, _original: Option<&std::fs::Metadata>) {}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn modes_are_kept_and_new_files_are_private() {
        let dir = std::env::temp_dir().join(format!("llmproxy-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, existing, want) in [
            ("private.yaml", Some(0o600), 0o600),
            ("group.yaml", Some(0o640), 0o640),
            ("open.yaml", Some(0o644), 0o644),
            ("new.yaml", None, 0o600),
        ] {
            let p = dir.join(name);
            let _ = std::fs::remove_file(&p);
            if let Some(m) = existing {
                std::fs::write(&p, "old").unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
            }
            replace(&p, b"new", PRIVATE_MODE).unwrap();
            assert_eq!(std::fs::read_to_string(&p).unwrap(), "new", "{name}");
            assert_eq!(mode(&p), want, "{name}");
            assert_eq!(readable_by_others(&p).is_some(), want & 0o077 != 0, "{name}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
