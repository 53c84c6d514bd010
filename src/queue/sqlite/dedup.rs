//! Deduplication by digest without a random write per webhook (schema version 6).
//!
//! A redelivered body is found by its digest's first 8 bytes: in the `digests` table for the
//! webhooks up to `counters.digests_through`, and in memory ([`Dedup`]'s recent set) for the
//! ones after it. Every candidate is then compared on its row, whole digest and source, so a
//! prefix shared by two bodies (or two sources) never makes one a duplicate of the other.
//!
//! The recent set is written to `digests` in sorted batches ([`Dedup::merge_some`], on the
//! queue thread between group commits, each chunk its own transaction): an index taking one
//! random insert per webhook wrote about one page per webhook to the WAL, and that was half
//! of a webhook's cost on the request path; a batch of [`MERGE_AT`] sorted entries writes each
//! page it touches once.
//!
//! Nothing here needs to survive a crash: the set is rebuilt from the webhooks table (the rows
//! after `digests_through`, read in id order) the first time a webhook is looked up after a
//! start. A merge chunk's entries are `INSERT OR IGNORE`d, and the counter moves only in the
//! last chunk's transaction, so a merge cut short by a crash is redone whole. An entry whose
//! webhook was rolled back or deleted matches no row and is dropped by the next merge. The
//! error here is only ever a duplicate let in, never a webhook called a duplicate of one not
//! stored: every match is confirmed on a row in the lookup's own transaction. (One such case:
//! a group rolled back, its id taken again by a webhook stored while a merge was past that id,
//! whose digest then reaches the table only with the next merge, or, after a restart, never.)

use std::collections::BTreeSet;

use rusqlite::{Connection, TransactionBehavior, params};

/// Webhooks looked up in memory before they are merged into `digests`: about 1.5 MB of
/// memory at most. Against a table of a million digests (about 4,000 pages), merging 50,000
/// sorted entries writes each page about once: a twelfth of a page per webhook.
pub(super) const MERGE_AT: usize = 50_000;

/// Entries one merge transaction writes: a few milliseconds of the queue thread, between two
/// group commits.
const MERGE_CHUNK: usize = 2_000;

type Entry = ([u8; 8], i64);

/// Whether webhook `?1` has digest `?2` on source `?3`: a recent entry confirmed on its row.
const SAME_ROW: &str =
    "SELECT EXISTS (SELECT 1 FROM webhooks WHERE id = ?1 AND digest = ?2 AND source = ?3)";

/// Whether a merged entry with prefix `?1` is a webhook with digest `?2` on source `?3`.
const IN_DIGESTS: &str =
    "SELECT EXISTS (SELECT 1 FROM digests d JOIN webhooks w ON w.id = d.webhook_id
     WHERE d.prefix = ?1 AND w.digest = ?2 AND w.source = ?3)";

/// The queue thread's deduplication state.
pub(super) struct Dedup {
    /// Prefixes and ids of the webhooks stored after `digests_through`; `None` until the first
    /// lookup after a start reads them.
    recent: Option<BTreeSet<Entry>>,
    /// The merge under way: its entries in prefix order, and how many are written.
    merging: Option<Merge>,
    /// [`MERGE_AT`], smaller in tests.
    merge_at: usize,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup {
            recent: None,
            merging: None,
            merge_at: MERGE_AT,
        }
    }
}

struct Merge {
    entries: Vec<Entry>,
    written: usize,
}

fn prefix(digest: &[u8; 32]) -> [u8; 8] {
    let mut prefix = [0; 8];
    prefix.copy_from_slice(&digest[..8]);
    prefix
}

impl Dedup {
    /// Whether a webhook with `digest` is stored on `source` already, in `tx`.
    pub fn is_known(
        &mut self,
        tx: &Connection,
        source: &str,
        digest: &[u8; 32],
    ) -> rusqlite::Result<bool> {
        let prefix = prefix(digest);
        let recent = self.recent(tx)?;
        let mut same_row = tx.prepare_cached(SAME_ROW)?;
        for (_, id) in recent.range((prefix, i64::MIN)..=(prefix, i64::MAX)) {
            if same_row.query_row(params![id, &digest[..], source], |row| row.get(0))? {
                return Ok(true);
            }
        }
        tx.prepare_cached(IN_DIGESTS)?
            .query_row(params![&prefix[..], &digest[..], source], |row| row.get(0))
    }

    /// Notes the webhook just inserted as `id` (in the caller's transaction).
    pub fn note(&mut self, digest: &[u8; 32], id: i64) {
        if let Some(recent) = &mut self.recent {
            recent.insert((prefix(digest), id));
        }
    }

    /// Whether [`Dedup::merge_some`] has work.
    pub fn wants_merge(&self) -> bool {
        self.merging.is_some()
            || self
                .recent
                .as_ref()
                .is_some_and(|r| r.len() >= self.merge_at)
    }

    /// Writes the next chunk of the merge (starting one when the recent set is large enough),
    /// in a transaction of its own with the connection's NORMAL synchronous: losing one to a
    /// power loss only leaves its entries to the next merge.
    pub fn merge_some(&mut self, conn: &mut Connection) -> rusqlite::Result<()> {
        if self.merging.is_none() {
            let Some(recent) = self.recent.as_ref().filter(|r| r.len() >= self.merge_at) else {
                return Ok(());
            };
            self.merging = Some(Merge {
                entries: recent.iter().copied().collect(),
                written: 0,
            });
        }
        let Some(merge) = &mut self.merging else {
            return Ok(());
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let end = (merge.written + MERGE_CHUNK).min(merge.entries.len());
        {
            // From the row: an entry whose webhook is gone (rolled back, deleted) writes
            // nothing, and one whose id a later webhook took writes that webhook's prefix.
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO digests (prefix, webhook_id)
                 SELECT substr(digest, 1, 8), id FROM webhooks WHERE id = ?1",
            )?;
            for (_, id) in &merge.entries[merge.written..end] {
                insert.execute(params![id])?;
            }
        }
        let done = end == merge.entries.len();
        if done {
            let through = merge.entries.iter().map(|(_, id)| *id).max().unwrap_or(0);
            tx.execute(
                "UPDATE counters SET value = MAX(value, ?1) WHERE name = 'digests_through'",
                params![through],
            )?;
        }
        tx.commit()?;
        merge.written = end;
        if done {
            let merged = self.merging.take().map(|m| m.entries).unwrap_or_default();
            if let Some(recent) = &mut self.recent {
                for entry in &merged {
                    recent.remove(entry);
                }
            }
        }
        Ok(())
    }

    /// The recent set, read from the webhooks after `digests_through` the first time.
    fn recent(&mut self, conn: &Connection) -> rusqlite::Result<&BTreeSet<Entry>> {
        if self.recent.is_none() {
            let mut select = conn.prepare(
                "SELECT substr(digest, 1, 8), id FROM webhooks
                 WHERE id > (SELECT value FROM counters WHERE name = 'digests_through')",
            )?;
            let rows = select.query_map([], |row| {
                let bytes: Vec<u8> = row.get(0)?;
                let mut prefix = [0; 8];
                let n = bytes.len().min(8);
                prefix[..n].copy_from_slice(&bytes[..n]);
                Ok((prefix, row.get::<_, i64>(1)?))
            })?;
            self.recent = Some(rows.collect::<rusqlite::Result<BTreeSet<Entry>>>()?);
        }
        Ok(self.recent.get_or_insert_with(BTreeSet::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// A queue file's schema on a fresh connection, and a way to store a webhook the way the
    /// writer does (its row, then the note).
    fn file() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("queue.sqlite3")).unwrap();
        super::super::schema::prepare(&mut conn).unwrap();
        (dir, conn)
    }

    fn digest(body: &str) -> [u8; 32] {
        Sha256::digest(body.as_bytes()).into()
    }

    fn store(conn: &Connection, dedup: &mut Dedup, source: &str, body: &str) -> bool {
        let digest = digest(body);
        if dedup.is_known(conn, source, &digest).unwrap() {
            return false;
        }
        conn.execute(
            "INSERT INTO webhooks (source, digest, body, received_at) VALUES (?1, ?2, x'', 0)",
            params![source, &digest[..]],
        )
        .unwrap();
        dedup.note(&digest, conn.last_insert_rowid());
        true
    }

    fn small() -> Dedup {
        Dedup {
            merge_at: 3,
            ..Dedup::default()
        }
    }

    fn digests(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM digests", [], |row| row.get(0))
            .unwrap()
    }

    fn merge_all(conn: &mut Connection, dedup: &mut Dedup) {
        while dedup.wants_merge() {
            dedup.merge_some(conn).unwrap();
        }
    }

    #[test]
    fn a_body_is_a_duplicate_on_its_source_before_and_after_its_digest_is_merged() {
        let (_dir, mut conn) = file();
        let mut dedup = small();
        for body in ["a", "b"] {
            assert!(store(&conn, &mut dedup, "s", body));
        }
        assert!(!store(&conn, &mut dedup, "s", "a"), "found in memory");
        assert!(
            store(&conn, &mut dedup, "other", "a"),
            "another source: a new webhook"
        );
        assert!(dedup.wants_merge());
        merge_all(&mut conn, &mut dedup);
        assert_eq!(digests(&conn), 3);
        assert_eq!(dedup.recent.as_ref().map(BTreeSet::len), Some(0));
        assert!(!store(&conn, &mut dedup, "s", "a"), "found in the table");
        assert!(!store(&conn, &mut dedup, "other", "a"));
        assert!(store(&conn, &mut dedup, "s", "c"));
    }

    #[test]
    fn a_restart_reads_the_unmerged_digests_back_and_a_cut_merge_is_redone() {
        let (_dir, mut conn) = file();
        let mut dedup = Dedup::default(); // no merge: all five stay in memory
        for body in ["a", "b", "c", "d", "e"] {
            assert!(store(&conn, &mut dedup, "s", body));
        }
        // A merge's first chunk committed, then the process died: two entries written, the
        // counter not moved.
        conn.execute_batch(
            "INSERT INTO digests SELECT substr(digest, 1, 8), id FROM webhooks WHERE id <= 2",
        )
        .unwrap();
        assert_eq!(digests(&conn), 2);
        // A new start: every webhook after the counter is looked up in memory again.
        let mut restarted = small();
        for body in ["a", "b", "c", "d", "e"] {
            assert!(!store(&conn, &mut restarted, "s", body), "{body}");
        }
        assert_eq!(restarted.recent.as_ref().map(BTreeSet::len), Some(5));
        merge_all(&mut conn, &mut restarted);
        assert_eq!(digests(&conn), 5, "the cut merge's entries once each");
        let through: i64 = conn
            .query_row(
                "SELECT value FROM counters WHERE name = 'digests_through'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(through, 5);
    }

    #[test]
    fn an_entry_of_a_webhook_rolled_back_or_deleted_matches_nothing_and_is_not_written() {
        let (_dir, mut conn) = file();
        let mut dedup = small();
        {
            let tx = conn.transaction().unwrap();
            assert!(store(&tx, &mut dedup, "s", "rolled back"));
            // dropped: rolls back
        }
        assert!(
            store(&conn, &mut dedup, "s", "rolled back"),
            "not a duplicate"
        );
        assert!(store(&conn, &mut dedup, "s", "deleted"));
        conn.execute("DELETE FROM webhooks WHERE body = x'' AND id = 2", [])
            .unwrap();
        assert!(store(&conn, &mut dedup, "s", "deleted"), "its row is gone");
        dedup.merge_at = 1;
        merge_all(&mut conn, &mut dedup);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM webhooks", [], |row| row.get(0))
            .unwrap();
        assert_eq!(digests(&conn), rows, "one entry per stored webhook");
        // The trigger: deleting a merged webhook deletes its entry.
        conn.execute("DELETE FROM webhooks WHERE id = 1", [])
            .unwrap();
        assert_eq!(digests(&conn), rows - 1);
    }

    #[test]
    fn a_lookup_runs_its_prepared_statements_without_parsing_them_again() {
        // SQLite prepares a statement again when a new binding could change its plan (a
        // partial index's condition compared with a bound value), unless the connection asks
        // for stable plans: a profile found that on every webhook, 16 % of the relay's CPU.
        let (_dir, conn) = file();
        let mut dedup = small();
        for body in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            assert!(store(&conn, &mut dedup, "s", body));
            // A digest sharing the stored one's prefix runs the row check too.
            let mut other = digest(body);
            other[31] ^= 1;
            assert!(!dedup.is_known(&conn, "s", &other).unwrap());
        }
        for sql in [SAME_ROW, IN_DIGESTS] {
            let statement = conn.prepare_cached(sql).unwrap();
            assert_eq!(
                statement.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{sql}"
            );
        }
    }
}
