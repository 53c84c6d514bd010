//! The Postgres behind the relay's shared queue, seen from the harness: a database of the
//! harness's own, dropped and created again so that each use starts empty (never the database
//! the URL names: that one only serves to connect and create it); the server's version and
//! durability settings as it reports them at bench time; and its postmaster's pid, so that the
//! server's CPU can be counted when it runs on this machine.
//!
//! The URL's role must be allowed to create databases (`CREATEDB`); dropping uses
//! `DROP DATABASE ... WITH (FORCE)` (Postgres 13 or later). Plain TCP only (`NoTls`): the
//! bench's server is on loopback.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::procfs;

/// What the server said about itself at bench time, and how it was used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    /// `host:port` from the URL (no credentials).
    pub address: String,
    /// The database the relay used.
    pub database: String,
    /// `SHOW server_version`.
    pub version: String,
    pub fsync: String,
    pub synchronous_commit: String,
    pub full_page_writes: String,
    pub wal_sync_method: String,
    pub shared_buffers: String,
    pub max_connections: String,
    /// `SHOW data_directory`: needs `pg_read_all_settings` (`bench/postgres.sh` grants it).
    pub data_directory: Option<String>,
    /// The server runs on this machine and its processes' CPU time was measured.
    pub cpu_counted: bool,
}

impl Setup {
    /// A 202 from the relay then follows a commit that survives a crash of the machine:
    /// commits wait for their WAL to be flushed, and flushing really reaches the disk.
    pub fn durable(&self) -> bool {
        self.fsync == "on" && self.synchronous_commit != "off"
    }
}

/// The harness's database on a Postgres server.
pub struct BenchDatabase {
    admin_url: String,
    pub name: String,
    /// The URL the relay gets: the given URL with its database replaced by [`Self::name`].
    pub url: String,
    /// The server's postmaster, when it is a process of this machine.
    pub postmaster: Option<u32>,
    address: String,
}

/// `url` with its database (the path) replaced by `name`; the query string is kept.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!("the Postgres address must be a postgres:// URL");
    };
    ensure!(
        scheme == "postgres" || scheme == "postgresql",
        "the Postgres address must be a postgres:// URL, not {scheme}://"
    );
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    Ok(format!("{scheme}://{authority}/{name}{query}"))
}

/// A database name the harness may drop: plain lower-case letters, digits and underscores.
fn check_name(name: &str) -> anyhow::Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit()),
        "database name {name:?}: use lower-case letters, digits and underscores"
    );
    Ok(())
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<Client> {
    let mut config = Config::from_str(url).context("the Postgres URL")?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .context("cannot connect to Postgres")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("postgres connection: {error}");
        }
    });
    Ok(client)
}

/// One server setting, as `SHOW` prints it.
async fn show(client: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    client
        .query_one(&format!("SHOW {name}"), &[])
        .await?
        .try_get(0)
}

/// The postmaster of the session's server, if that server is a process of this machine: the
/// parent of the session's backend, both named `postgres`.
async fn postmaster(client: &Client) -> Option<u32> {
    let row = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .ok()?;
    let backend = u32::try_from(row.try_get::<_, i32>(0).ok()?).ok()?;
    let parent = procfs::parent(backend)?;
    let is_postgres = |pid| procfs::command(pid).is_some_and(|name| name == "postgres");
    (is_postgres(backend) && is_postgres(parent)).then_some(parent)
}

impl BenchDatabase {
    /// Connects with `admin_url` and (re)creates the empty database `name` on that server.
    pub async fn create(admin_url: &str, name: &str) -> anyhow::Result<BenchDatabase> {
        check_name(name)?;
        let config = Config::from_str(admin_url).context("the Postgres URL")?;
        ensure!(
            config.get_dbname() != Some(name),
            "the Postgres URL names the database {name}, which the harness drops and creates: \
             give it another database to connect to (e.g. postgres)"
        );
        let address = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(Host::Tcp(host)), port) => format!("{host}:{}", port.copied().unwrap_or(5432)),
            (Some(Host::Unix(path)), _) => path.display().to_string(),
            (None, _) => "localhost".into(),
        };
        let client = connect(admin_url).await?;
        let database = BenchDatabase {
            admin_url: admin_url.into(),
            name: name.into(),
            url: with_database(admin_url, name)?,
            postmaster: postmaster(&client).await,
            address,
        };
        database.recreate().await?;
        Ok(database)
    }

    /// Drops the database (ending any session still on it) and creates it again, empty.
    pub async fn recreate(&self) -> anyhow::Result<()> {
        self.drop_database().await?;
        let client = connect(&self.admin_url).await?;
        // One statement per call: several in one string would run in a transaction, where
        // CREATE DATABASE is not allowed.
        client
            .batch_execute(&format!("CREATE DATABASE \"{}\"", self.name))
            .await
            .with_context(|| format!("cannot create the database {}", self.name))?;
        Ok(())
    }

    /// Drops the database, ending any session still on it (at the end, to give its disk
    /// space back).
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        let client = connect(&self.admin_url).await?;
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("cannot drop the database {}", self.name))?;
        Ok(())
    }

    /// The server's version and durability settings, read now.
    pub async fn setup(&self) -> anyhow::Result<Setup> {
        let client = connect(&self.url).await?;
        let setting = async |name: &str| -> anyhow::Result<String> {
            show(&client, name)
                .await
                .with_context(|| format!("SHOW {name}"))
        };
        Ok(Setup {
            address: self.address.clone(),
            database: self.name.clone(),
            version: setting("server_version").await?,
            fsync: setting("fsync").await?,
            synchronous_commit: setting("synchronous_commit").await?,
            full_page_writes: setting("full_page_writes").await?,
            wal_sync_method: setting("wal_sync_method").await?,
            shared_buffers: setting("shared_buffers").await?,
            max_connections: setting("max_connections").await?,
            data_directory: show(&client, "data_directory").await.ok(),
            cpu_counted: self.postmaster.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced_and_its_query_kept() {
        let cases = [
            (
                "postgres://u:p@127.0.0.1:5434/postgres",
                "postgres://u:p@127.0.0.1:5434/relay_bench",
            ),
            ("postgres://u@host", "postgres://u@host/relay_bench"),
            (
                "postgresql://u@host:1/db?sslmode=disable&application_name=x",
                "postgresql://u@host:1/relay_bench?sslmode=disable&application_name=x",
            ),
            (
                "postgres://u@host?sslmode=disable",
                "postgres://u@host/relay_bench?sslmode=disable",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(
                with_database(url, "relay_bench").ok().as_deref(),
                Some(expected)
            );
        }
    }

    #[test]
    fn a_key_value_connection_string_is_refused() {
        assert!(with_database("host=localhost dbname=x", "relay_bench").is_err());
        assert!(with_database("mysql://u@host/db", "relay_bench").is_err());
    }

    #[test]
    fn only_plain_database_names_are_dropped() {
        assert!(check_name("relay_bench").is_ok());
        assert!(check_name("relay_bench_smoke2").is_ok());
        for bad in ["", "Relay", "a\"; DROP", "1db", "with space"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durable_means_fsync_on_and_commits_waiting_for_the_flush() {
        let setup = |fsync: &str, synchronous_commit: &str| Setup {
            address: String::new(),
            database: String::new(),
            version: "15".into(),
            fsync: fsync.into(),
            synchronous_commit: synchronous_commit.into(),
            full_page_writes: "on".into(),
            wal_sync_method: "fdatasync".into(),
            shared_buffers: "128MB".into(),
            max_connections: "100".into(),
            data_directory: None,
            cpu_counted: false,
        };
        assert!(setup("on", "on").durable());
        assert!(setup("on", "local").durable());
        assert!(!setup("off", "on").durable());
        assert!(!setup("on", "off").durable());
    }
}
