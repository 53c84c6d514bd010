//! How many bytes a relay's queue takes per stored webhook (issue 17): a SQLite queue file read
//! through a read-only connection beside the running relay, or a Postgres queue's relation
//! sizes. Measured after the ingest runs, before anything is pruned (the relay keeps every
//! webhook for `queue.dedup_window_secs`, 7 days by default).
//!
//! SQLite: the relay holds its file open and keeps checkpointing it, so the file's size on disk
//! says little (pages freed by deletes stay in it, committed pages may still be in the WAL
//! only). A reader's `page_count` is the database's size as of the last commit, WAL included,
//! and `freelist_count` the pages in it that hold nothing; their difference times the page size
//! is what the data takes. The WAL's own size on disk is reported beside it, not counted: its
//! frames are copies of pages already counted, and it is reused after each checkpoint. The
//! bundled SQLite has the `dbstat` table, which splits the pages in use by table and index.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

/// Stored bytes per webhook, at most (issue 17): 0.6 KB, read as 600 bytes (the stricter
/// reading of KB).
pub const MAX_BYTES_PER_WEBHOOK: f64 = 600.0;

/// A queue's size, and what it holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Storage {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Rows of `webhooks` (every webhook stored) and of `records` (what they map to).
    pub webhooks: u64,
    pub records: u64,
    /// Bytes the data takes. SQLite: pages in use, `(page_count − freelist_count) ×
    /// page_size`, plus [`Self::other_files_bytes`]; Postgres: `pg_total_relation_size` of `webhooks` and `records` (their
    /// indexes and TOAST included).
    pub bytes: u64,
    /// SQLite: the page size, the database file's size on disk and the WAL's.
    pub page_size: Option<u64>,
    pub file_bytes: Option<u64>,
    pub wal_bytes: Option<u64>,
    /// SQLite: files the relay keeps in its queue folder beside the database (none today): a
    /// storage path that moves data out of SQLite is measured whole.
    #[serde(default)]
    pub other_files_bytes: u64,
    /// Per table, index (and Postgres TOAST), largest first; empty when not available.
    pub objects: Vec<StoredObject>,
}

/// One table or index of the queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredObject {
    pub name: String,
    pub bytes: u64,
}

impl Storage {
    /// Bytes per stored webhook (`None` with no webhook stored).
    pub fn bytes_per_webhook(&self) -> Option<f64> {
        (self.webhooks > 0).then(|| self.bytes as f64 / self.webhooks as f64)
    }

    /// Whether it is within [`MAX_BYTES_PER_WEBHOOK`].
    pub fn met(&self) -> bool {
        self.bytes_per_webhook()
            .is_some_and(|b| b <= MAX_BYTES_PER_WEBHOOK)
    }
}

/// `<file>-wal`, where SQLite keeps a WAL-mode database's log.
fn wal_path(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push("-wal");
    PathBuf::from(path)
}

/// The SQLite queue file `file` as it stands, read beside the relay that holds it. Blocking
/// (`dbstat` reads every page): call it off the runtime's threads ([`sqlite_queue`]).
pub fn sqlite_file(file: &Path) -> anyhow::Result<Storage> {
    // Read-only, and never created: a wrong path is an error, not an empty database.
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {} read-only", file.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let pragma = |name: &str| -> anyhow::Result<u64> {
        let value: i64 = conn
            .pragma_query_value(None, name, |row| row.get(0))
            .with_context(|| format!("PRAGMA {name}"))?;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    let count = |table: &str| -> anyhow::Result<u64> {
        let value: i64 = conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .with_context(|| format!("counting {table}"))?;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    // One read transaction: the counts and the page figures describe the same snapshot.
    conn.execute_batch("BEGIN")?;
    let page_size = pragma("page_size")?;
    let pages = pragma("page_count")?;
    let free = pragma("freelist_count")?;
    let webhooks = count("webhooks")?;
    let records = count("records")?;
    let objects = dbstat(&conn).unwrap_or_default();
    conn.execute_batch("COMMIT")?;
    let size = |path: &Path| std::fs::metadata(path).ok().map(|m| m.len());
    let other_files_bytes = other_files(file);
    Ok(Storage {
        backend: "sqlite".into(),
        webhooks,
        records,
        bytes: pages.saturating_sub(free) * page_size + other_files_bytes,
        page_size: Some(page_size),
        file_bytes: size(file),
        wal_bytes: size(&wal_path(file)),
        other_files_bytes,
        objects,
    })
}

/// Bytes of the files in the database's folder that are neither the database and SQLite's
/// files beside it (`-wal`, `-shm`, `-journal`) nor the relay's lock, nor what the harness puts
/// there (the relay's log, its sources file): the harness gives each relay a folder of its own.
fn other_files(file: &Path) -> u64 {
    let (Some(folder), Some(name)) = (file.parent(), file.file_name().and_then(|n| n.to_str()))
    else {
        return 0;
    };
    let known = |other: &str| {
        other == "relay.log"
            || other == "sources.toml"
            || other
                .strip_prefix(name)
                .is_some_and(|tail| ["", "-wal", "-shm", "-journal", ".lock"].contains(&tail))
    };
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| !entry.file_name().to_str().is_some_and(known))
        .filter_map(|entry| entry.metadata().ok())
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len())
        .sum()
}

/// Pages in use per table and index, from the `dbstat` virtual table (`None` if this SQLite
/// was built without it).
fn dbstat(conn: &Connection) -> Option<Vec<StoredObject>> {
    // `aggregate = TRUE`: one row per b-tree, `pgsize` the bytes of all its pages.
    let mut statement = conn
        .prepare("SELECT name, pgsize FROM dbstat WHERE aggregate = TRUE ORDER BY pgsize DESC")
        .ok()?;
    let rows = statement
        .query_map([], |row| {
            Ok(StoredObject {
                name: row.get(0)?,
                bytes: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
            })
        })
        .ok()?;
    rows.collect::<Result<Vec<_>, _>>().ok()
}

/// [`sqlite_file`] on a blocking thread.
pub async fn sqlite_queue(file: PathBuf) -> anyhow::Result<Storage> {
    tokio::task::spawn_blocking(move || sqlite_file(&file))
        .await
        .context("the size reader stopped")?
}

/// Rows of `webhooks` in the SQLite queue `file` (read-only, beside the relay).
pub async fn sqlite_webhooks(file: PathBuf) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let conn = Connection::open_with_flags(&file, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {} read-only", file.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let count: i64 = conn.query_row("SELECT COUNT(*) FROM webhooks", [], |row| row.get(0))?;
        Ok(u64::try_from(count).unwrap_or(0))
    })
    .await
    .context("the count reader stopped")?
}

/// The Postgres queue in the database `url` names: `webhooks` and `records` with their
/// indexes and TOAST, as the relay's schema in its `search_path` has them.
pub async fn postgres_queue(url: &str) -> anyhow::Result<Storage> {
    let client = crate::postgres::connect(url).await?;
    let row = client
        .query_one(
            "SELECT (SELECT COUNT(*) FROM webhooks), (SELECT COUNT(*) FROM records), \
             pg_total_relation_size('webhooks') + pg_total_relation_size('records')",
            &[],
        )
        .await
        .context("the queue's size")?;
    let unsigned = |value: i64| u64::try_from(value).unwrap_or(0);
    let (webhooks, records, bytes): (i64, i64, i64) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    // Each table, each of its indexes, and its TOAST (what is left of its total).
    let rows = client
        .query(
            "SELECT c.relname::text, pg_relation_size(c.oid) FROM pg_class c \
             WHERE c.oid IN ('webhooks'::regclass, 'records'::regclass) \
             OR c.oid IN (SELECT indexrelid FROM pg_index \
                          WHERE indrelid IN ('webhooks'::regclass, 'records'::regclass)) \
             UNION ALL \
             SELECT t || ' (TOAST)', pg_total_relation_size(t::regclass) \
                    - pg_relation_size(t::regclass) - pg_indexes_size(t::regclass) \
             FROM unnest(ARRAY['webhooks', 'records']) AS t \
             ORDER BY 2 DESC",
            &[],
        )
        .await
        .context("the queue's relations")?;
    let objects = rows
        .iter()
        .map(|row| -> anyhow::Result<StoredObject> {
            Ok(StoredObject {
                name: row.try_get(0)?,
                bytes: unsigned(row.try_get(1)?),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Storage {
        backend: "postgres".into(),
        webhooks: unsigned(webhooks),
        records: unsigned(records),
        bytes: unsigned(bytes),
        page_size: None,
        file_bytes: None,
        wal_bytes: None,
        other_files_bytes: 0,
        objects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sqlite_file_is_measured_beside_a_writer_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("queue.sqlite3");
        let writer = Connection::open(&file).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE webhooks (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
                 CREATE TABLE records (id INTEGER PRIMARY KEY, webhook_id INTEGER NOT NULL);
                 CREATE INDEX records_webhook ON records (webhook_id);",
            )
            .unwrap();
        for id in 0..1000 {
            writer
                .execute(
                    "INSERT INTO webhooks (id, body) VALUES (?1, zeroblob(300))",
                    [id],
                )
                .unwrap();
            writer
                .execute("INSERT INTO records (webhook_id) VALUES (?1)", [id])
                .unwrap();
        }
        // The writer stays open, as the relay does: its last pages may be in the WAL only.
        let storage = sqlite_file(&file).unwrap();
        assert_eq!((storage.webhooks, storage.records), (1000, 1000));
        let per_webhook = storage.bytes_per_webhook().unwrap();
        assert!((300.0..600.0).contains(&per_webhook), "{per_webhook}");
        assert!(storage.wal_bytes.is_some_and(|b| b > 0));
        assert_eq!(storage.other_files_bytes, 0);
        let names: Vec<&str> = storage.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names.first(), Some(&"webhooks"), "{names:?}");
        assert!(names.contains(&"records_webhook"), "{names:?}");
        drop(writer);
        // A file the relay keeps beside the database counts whole; the log does not.
        std::fs::write(dir.path().join("relay.log"), [0; 100]).unwrap();
        std::fs::write(dir.path().join("bodies.log"), [0; 1000]).unwrap();
        let with_side_file = sqlite_file(&file).unwrap();
        assert_eq!(with_side_file.other_files_bytes, 1000);
        assert!(with_side_file.bytes >= 1000);
        assert!(sqlite_file(&dir.path().join("missing.sqlite3")).is_err());
    }
}
