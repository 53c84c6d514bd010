//! Postgres for tests, on the server named by `RELAY_TEST_POSTGRES_URL` (`.ci/postgres.sh`
//! starts one and prints it): a fresh schema per test (the URL then sets `search_path`), or a
//! fresh database whose connections a test can cut off and restore.
//!
//! Whether the tests that need it run is decided when they are built: `build.rs` turns on
//! `cfg(postgres_tests)` when the variable is set, and every such test carries
//! `#[cfg_attr(not(postgres_tests), ignore = "...")]`, so without a server `cargo test` lists
//! them as ignored instead of passing them without running anything.

use tokio_postgres::{Client, NoTls};
use userpilot_heap_relay::queue::postgres::PostgresQueue;

pub const URL_VAR: &str = "RELAY_TEST_POSTGRES_URL";

/// A superuser's URL on the same server and database (`.ci/postgres.sh` creates the role and
/// the `pageinspect` extension): what a test needs to read raw pages, which the relay's own
/// role may not.
pub const INSPECT_URL_VAR: &str = "RELAY_TEST_POSTGRES_INSPECT_URL";

/// The server's URL. Only Postgres tests call it, and they are ignored unless the variable was
/// set at build time, so here it is missing only when it was unset between build and run.
pub fn base_url() -> String {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "{URL_VAR} is not set, but this test binary was built with it (cfg postgres_tests): \
             set it again, or rebuild without it to ignore the Postgres tests"
        ),
    }
}

/// The inspector's URL ([`INSPECT_URL_VAR`]). A Postgres test that needs it fails when it is
/// missing rather than passing without its check.
pub fn inspect_url() -> String {
    match std::env::var(INSPECT_URL_VAR) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "{INSPECT_URL_VAR} is not set, but the Postgres tests run (cfg postgres_tests): the \
             raw-page check needs a superuser with the pageinspect extension; `source \
             .ci/postgres.sh` sets both up and exports it"
        ),
    }
}

/// A lane (app id) of its own, so that the queues of different tests, sharing one database's
/// leader locks, never wait for one leader.
pub fn lane() -> String {
    format!("app-{}", uuid::Uuid::new_v4().simple())
}

/// A plain connection, its driver running in the background.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR}: {e}"));
    tokio::spawn(connection);
    client
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// `url` with `search_path` set to `schema` on every connection.
pub fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{schema}")
}

/// `url` pointing at database `name` instead.
pub fn with_database(url: &str, name: &str) -> String {
    let (before, after) = match url.find('?') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let (prefix, _) = before.rsplit_once('/').unwrap();
    format!("{prefix}/{name}{after}")
}

/// A schema of its own for one test.
pub struct Schema {
    pub name: String,
    /// The server URL with `search_path` set to this schema.
    pub url: String,
    admin: Client,
}

impl Schema {
    /// A schema on the server of [`URL_VAR`].
    pub async fn fresh() -> Schema {
        Schema::create(&base_url()).await
    }

    /// A queue on this schema. Leader locks are per database: a test whose queues must not
    /// wait for another test's leader claims lanes of its own ([`lane`]).
    pub async fn queue(&self) -> PostgresQueue {
        PostgresQueue::connect(&self.url).await.unwrap()
    }

    pub async fn create(base: &str) -> Schema {
        let admin = connect(base).await;
        let name = unique("relay_test");
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        Schema {
            url: with_search_path(base, &name),
            name,
            admin,
        }
    }

    /// A query run in this schema (an admin connection, outside the queue under test).
    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{schema}", &self.name);
        self.admin.query_one(&sql, &[]).await.unwrap().get(0)
    }

    pub async fn drop(self) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await;
    }
}

/// A database of its own for one test, whose connections the test can cut.
pub struct Database {
    pub name: String,
    pub url: String,
    admin: Client,
}

impl Database {
    /// A database on the server of [`URL_VAR`].
    pub async fn fresh() -> Database {
        Database::create(&base_url()).await
    }

    pub async fn create(base: &str) -> Database {
        let admin = connect(base).await;
        let name = unique("relay_test");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Database {
            url: with_database(base, &name),
            name,
            admin,
        }
    }

    /// Postgres "goes away" for this database: new connections are refused and the open ones
    /// are terminated.
    pub async fn cut_off(&self) {
        self.admin
            .batch_execute(&format!(
                "ALTER DATABASE {} WITH ALLOW_CONNECTIONS false",
                self.name
            ))
            .await
            .unwrap();
        self.admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .unwrap();
    }

    /// Postgres is back.
    pub async fn restore(&self) {
        self.admin
            .batch_execute(&format!(
                "ALTER DATABASE {} WITH ALLOW_CONNECTIONS true",
                self.name
            ))
            .await
            .unwrap();
    }

    pub async fn drop(self) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await;
    }
}
