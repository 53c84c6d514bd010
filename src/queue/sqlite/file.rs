//! Whether the configured path still names the file the queue has open. SQLite keeps writing
//! to an open file after it was removed (an operator's `rm`, a volume mounted over the
//! directory): every commit would succeed into an unlinked inode, and everything acknowledged
//! since would be gone at the next start. So the device and inode of the database and of its
//! `-wal` and `-shm` files are recorded at open and compared again after every webhook commit
//! and every readiness ping; once they differ, the queue is *lost* for good: webhooks are
//! refused (503) until the relay is restarted on a restored volume. It must not refuse for a
//! passing failure to stat the file (that only fails the check at hand).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::queue::QueueError;

/// A file's identity on its filesystem.
type Identity = (u64, u64);

/// The queue's files as opened.
#[derive(Debug)]
pub(super) struct QueueFile {
    path: PathBuf,
    /// Each file of the database (main, `-wal`, `-shm`) that existed at open, and its identity.
    opened: Vec<(PathBuf, Identity)>,
    lost: AtomicBool,
}

fn identity(path: &Path) -> std::io::Result<Identity> {
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
}

impl QueueFile {
    /// Records the identities of `path` and its WAL and shared-memory files, once the
    /// connections that keep them open exist (SQLite never recreates them while one is open).
    pub(super) fn record(path: &Path) -> Result<Self, QueueError> {
        let mut opened = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            let file = PathBuf::from(file);
            match identity(&file) {
                Ok(id) => opened.push((file, id)),
                // The WAL and shared memory exist once a connection used the file in WAL mode;
                // not having them at open only means there is less to check.
                Err(error)
                    if error.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
                Err(error) => {
                    return Err(QueueError::Storage(format!(
                        "queue file {}: {error}",
                        file.display()
                    )));
                }
            }
        }
        Ok(Self {
            path: path.to_owned(),
            opened,
            lost: AtomicBool::new(false),
        })
    }

    fn lost_error(&self) -> QueueError {
        QueueError::Storage(format!(
            "queue file {} was removed or replaced while the relay had it open; restart the \
             relay once the volume is restored",
            self.path.display()
        ))
    }

    /// Refuses at once, without looking at the disk, once the file was found lost.
    pub(super) fn refuse_if_lost(&self) -> Result<(), QueueError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.lost_error());
        }
        Ok(())
    }

    /// Looks whether every path still names the file opened; the first time one does not,
    /// marks the queue lost and says so in one ERROR line.
    pub(super) fn check(&self) -> Result<(), QueueError> {
        self.refuse_if_lost()?;
        for (file, opened) in &self.opened {
            match identity(file) {
                Ok(now) if now == *opened => {}
                Ok(_) => return Err(self.mark_lost(file, "replaced by another file")),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    return Err(self.mark_lost(file, "removed"));
                }
                Err(error) => {
                    return Err(QueueError::Storage(format!(
                        "queue file {}: {error}",
                        file.display()
                    )));
                }
            }
        }
        Ok(())
    }

    fn mark_lost(&self, file: &Path, what: &str) -> QueueError {
        if !self.lost.swap(true, Ordering::SeqCst) {
            tracing::error!(
                path = %self.path.display(),
                file = %file.display(),
                what,
                "queue file removed or replaced under the running relay: what is written now \
                 is lost at the next start, so webhooks are refused (503) from now on; restore \
                 the volume, then restart the relay"
            );
        }
        self.lost_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_or_replaced_file_is_lost_for_good_and_a_present_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        std::fs::write(&path, b"x").unwrap();
        let file = QueueFile::record(&path).unwrap();
        assert_eq!(file.opened.len(), 1, "no -wal or -shm to record");
        file.check().unwrap();

        // Replaced: the same name, another inode (the old one still linked, so it cannot be
        // reused for the new file).
        let kept = dir.path().join("old");
        std::fs::rename(&path, &kept).unwrap();
        std::fs::write(&path, b"x").unwrap();
        let error = file.check().unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("restart the relay"), "{error}");

        // Lost for good: putting the original back does not make it acceptable again.
        std::fs::rename(&kept, &path).unwrap();
        assert!(file.refuse_if_lost().is_err());
        assert!(file.check().is_err());
    }

    #[test]
    fn a_removed_wal_counts_as_a_lost_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        std::fs::write(&path, b"x").unwrap();
        let wal = dir.path().join("queue.sqlite3-wal");
        std::fs::write(&wal, b"x").unwrap();
        let file = QueueFile::record(&path).unwrap();
        file.check().unwrap();
        std::fs::remove_file(&wal).unwrap();
        assert!(
            file.check()
                .unwrap_err()
                .to_string()
                .contains("removed or replaced")
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a measurement: real time is the point
    fn checking_costs_a_few_microseconds() {
        // Measured for the choice to check after every group commit (one fsync, ~1 ms or more):
        // 3 stats of a local file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite3");
        for suffix in ["", "-wal", "-shm"] {
            std::fs::write(format!("{}{suffix}", path.display()), b"x").unwrap();
        }
        let file = QueueFile::record(&path).unwrap();
        let rounds = 10_000u32;
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            file.check().unwrap();
        }
        let each = started.elapsed() / rounds;
        eprintln!("one check of 3 files: {each:?}");
        assert!(each < std::time::Duration::from_millis(1), "{each:?}");
    }
}
