//! One serving relay per SQLite file (contract §4): the relay that forwards from a queue file
//! holds an exclusive `flock` on `<file>.lock` beside it for as long as it runs, and writes its
//! PID into it for the operator. A second relay started on the same file would otherwise
//! release the first one's leases at start ([`super::SqliteQueue::open_for_serving`]) and
//! forward beside it, sending every leased batch twice.
//!
//! The lock is the kernel's, not the file's content: it goes away with the process, `kill -9`
//! included, so a stale `<file>.lock` left behind never blocks the next start (the PID in it
//! is only read to name the holder). SQLite's own locking of the database is untouched, and
//! `dlq` commands, which open the queue without serving, take no lock and keep working beside
//! a running relay.
//!
//! It must not be taken on the database file itself: SQLite uses POSIX advisory locks on it,
//! and closing any descriptor of the file would drop them (POSIX semantics), so a separate
//! file keeps the two apart.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::queue::QueueError;

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub(super) struct ServingLock {
    _file: File,
}

/// `<queue file>.lock`.
pub(super) fn lock_path(queue: &Path) -> PathBuf {
    let mut path = queue.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

impl ServingLock {
    /// Takes the lock for the queue file `queue`, or says which process holds it.
    pub(super) fn acquire(queue: &Path) -> Result<Self, QueueError> {
        let path = lock_path(queue);
        let cannot = |error: std::io::Error| {
            QueueError::Storage(format!("cannot lock {}: {error}", path.display()))
        };
        // Not truncated at open: the file may be another relay's, whose PID is still to read.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(cannot)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let pid = match file.read_to_string(&mut holder) {
                    Ok(_) => holder.trim().parse::<u32>().ok(),
                    Err(_) => None,
                };
                let by = pid.map_or_else(
                    || "another relay".to_owned(),
                    |pid| format!("another relay (PID {pid})"),
                );
                return Err(QueueError::InUse(format!(
                    "queue file {} is in use by {by}, which holds {}: one relay serves a SQLite \
                     queue; stop it first, or use the postgres backend for several replicas",
                    queue.display(),
                    path.display()
                )));
            }
            Err(TryLockError::Error(error)) => return Err(cannot(error)),
        }
        file.set_len(0).map_err(cannot)?;
        file.rewind().map_err(cannot)?;
        writeln!(file, "{}", std::process::id()).map_err(cannot)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_is_refused_naming_the_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.sqlite3");
        let first = ServingLock::acquire(&queue).unwrap();
        let written = std::fs::read_to_string(lock_path(&queue)).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());

        // flock locks belong to the open file description: a second open in this process
        // conflicts exactly as another process would.
        let error = ServingLock::acquire(&queue).unwrap_err().to_string();
        assert!(error.contains(&queue.display().to_string()), "{error}");
        assert!(
            error.contains(&format!("PID {}", std::process::id())),
            "{error}"
        );

        drop(first);
        let again = ServingLock::acquire(&queue).unwrap();
        drop(again);
    }

    #[test]
    fn a_stale_lock_file_left_by_a_dead_process_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.sqlite3");
        std::fs::write(lock_path(&queue), "999999\n").unwrap();
        let _lock = ServingLock::acquire(&queue).unwrap();
        let written = std::fs::read_to_string(lock_path(&queue)).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());
    }
}
