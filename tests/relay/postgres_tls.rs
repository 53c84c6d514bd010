//! TLS between the shared queue and Postgres (`sslmode` in `queue.postgres_url`), against the
//! server in `RELAY_TEST_POSTGRES_URL` (ignored, with the reason, when it is not set). Debian's
//! server, which `.ci/postgres.sh` starts, serves TLS with its self-signed "snakeoil"
//! certificate, issued for a host name (never for an IP address).
//!
//! Covered: `require`, `prefer` and the default encrypt every session of the queue (the pool's
//! and the leader's, as `pg_stat_ssl` shows) and the queue works through them, while `disable`
//! does not encrypt; `verify-ca` accepts the server's certificate when it is the trusted root;
//! `verify-full` refuses a certificate that no trusted root signed, and one that is signed but
//! issued for another host, failing with an error saying so rather than connecting in the clear.

use tokio_postgres::Client;
use tokio_postgres::config::Host;
use userpilot_heap_relay::heap::wire::RecordKind;
use userpilot_heap_relay::queue::postgres::PostgresQueue;
use userpilot_heap_relay::queue::{Enqueued, Queue, QueueError};

use crate::support::postgres::{Schema, base_url, connect};
use crate::support::records;

const NOW: i64 = 1_700_000_000_000;

/// A root certificate that did not sign the test server's: ISRG Root X1 (Let's Encrypt).
const UNRELATED_ROOT: &str = "-----BEGIN CERTIFICATE-----
MIIFazCCA1OgAwIBAgIRAIIQz7DSQONZRGPgu2OCiwAwDQYJKoZIhvcNAQELBQAw
TzELMAkGA1UEBhMCVVMxKTAnBgNVBAoTIEludGVybmV0IFNlY3VyaXR5IFJlc2Vh
cmNoIEdyb3VwMRUwEwYDVQQDEwxJU1JHIFJvb3QgWDEwHhcNMTUwNjA0MTEwNDM4
WhcNMzUwNjA0MTEwNDM4WjBPMQswCQYDVQQGEwJVUzEpMCcGA1UEChMgSW50ZXJu
ZXQgU2VjdXJpdHkgUmVzZWFyY2ggR3JvdXAxFTATBgNVBAMTDElTUkcgUm9vdCBY
MTCCAiIwDQYJKoZIhvcNAQEBBQADggIPADCCAgoCggIBAK3oJHP0FDfzm54rVygc
h77ct984kIxuPOZXoHj3dcKi/vVqbvYATyjb3miGbESTtrFj/RQSa78f0uoxmyF+
0TM8ukj13Xnfs7j/EvEhmkvBioZxaUpmZmyPfjxwv60pIgbz5MDmgK7iS4+3mX6U
A5/TR5d8mUgjU+g4rk8Kb4Mu0UlXjIB0ttov0DiNewNwIRt18jA8+o+u3dpjq+sW
T8KOEUt+zwvo/7V3LvSye0rgTBIlDHCNAymg4VMk7BPZ7hm/ELNKjD+Jo2FR3qyH
B5T0Y3HsLuJvW5iB4YlcNHlsdu87kGJ55tukmi8mxdAQ4Q7e2RCOFvu396j3x+UC
B5iPNgiV5+I3lg02dZ77DnKxHZu8A/lJBdiB3QW0KtZB6awBdpUKD9jf1b0SHzUv
KBds0pjBqAlkd25HN7rOrFleaJ1/ctaJxQZBKT5ZPt0m9STJEadao0xAH0ahmbWn
OlFuhjuefXKnEgV4We0+UXgVCwOPjdAvBbI+e0ocS3MFEvzG6uBQE3xDk3SzynTn
jh8BCNAw1FtxNrQHusEwMFxIt4I7mKZ9YIqioymCzLq9gwQbooMDQaHWBfEbwrbw
qHyGO0aoSCqI3Haadr8faqU9GY/rOPNk3sgrDQoo//fb4hVC1CLQJ13hef4Y53CI
rU7m2Ys6xt0nUW7/vGT1M0NPAgMBAAGjQjBAMA4GA1UdDwEB/wQEAwIBBjAPBgNV
HRMBAf8EBTADAQH/MB0GA1UdDgQWBBR5tFnme7bl5AFzgAiIyBpY9umbbjANBgkq
hkiG9w0BAQsFAAOCAgEAVR9YqbyyqFDQDLHYGmkgJykIrGF1XIpu+ILlaS/V9lZL
ubhzEFnTIZd+50xx+7LSYK05qAvqFyFWhfFQDlnrzuBZ6brJFe+GnY+EgPbk6ZGQ
3BebYhtF8GaV0nxvwuo77x/Py9auJ/GpsMiu/X1+mvoiBOv/2X/qkSsisRcOj/KK
NFtY2PwByVS5uCbMiogziUwthDyC3+6WVwW6LLv3xLfHTjuCvjHIInNzktHCgKQ5
ORAzI4JMPJ+GslWYHb4phowim57iaztXOoJwTdwJx4nLCgdNbOhdjsnvzqvHu7Ur
TkXWStAmzOVyyghqpZXjFaH3pO3JLF+l+/+sKAIuvtd7u+Nxe5AW0wdeRlN8NwdC
jNPElpzVmbUq4JUagEiuTDkHzsxHpFKVK7q4+63SM1N95R1NbdWhscdCb+ZAJzVc
oyi3B43njTOQ5yOf+1CceWxG1bQVs5ZufpsMljq4Ui0/1lvh+wjChP4kqKOJ2qxq
4RgqsahDYVvTH9w7jXbyLeiNdd8XM2w9U/t7y0Ff/9yi0GE44Za4rF2LN9d11TPA
mRGunUHBcnWEvgJBQl9nJEiU0Zsnvgc/ubhPgXRR4Xq37Z0j4r7g1SgEEzwxA57d
emyPxgcYxn/eR44/KJ4EBs+lVDR3veyJm+kXQ99b21/+jh5Xos1AnX5iItreGCc=
-----END CERTIFICATE-----
";

// ---------------------------------------------------------------------------------------------
// Building blocks

/// The server, a plain admin connection to it, and a schema of this test's own; `None` (the
/// test skips) without `RELAY_TEST_POSTGRES_URL`. A server without TLS fails the test.
async fn server(test: &str) -> (Client, Schema) {
    let base = base_url();
    let admin = connect(&base).await;
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(
        ssl, "on",
        "{test}: the test server has ssl = off; .ci/postgres.sh must turn it on"
    );
    (admin, Schema::create(&base).await)
}

/// `url` with `params` appended to its query.
fn with(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

/// Connects a queue (its claims use a lane of their own, so that it forwards alone).
async fn queue(url: &str) -> Result<PostgresQueue, QueueError> {
    PostgresQueue::connect(url).await
}

/// The error connecting with `url`; panics if it connects.
async fn refused(url: &str) -> String {
    match queue(url).await {
        Ok(_) => panic!("connected, but should have been refused"),
        Err(error) => error.to_string(),
    }
}

/// The queue's sessions (by its `application_name`) and how many of them use TLS.
async fn sessions(admin: &Client, queue: &PostgresQueue) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = $1",
            &[&queue.replica_id()],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// One webhook with one track event, enqueued, then claimed (which opens the leader's
/// session): the queue works over this connection.
async fn round_trip(queue: &PostgresQueue) {
    let body = format!("webhook {}", uuid::Uuid::new_v4());
    let lane = crate::support::postgres::lane();
    let webhook = records::webhook(&body, NOW, vec![records::track("tls-1", "user-tls")]);
    let webhook = records::on(userpilot_heap_relay::queue::DEFAULT_SOURCE, &lane, webhook);
    assert_eq!(
        queue.enqueue(webhook).await.unwrap(),
        Enqueued::Accepted { events: 1 }
    );
    let claimed = queue
        .claim(&lane, RecordKind::Track, 10, NOW, 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].subject, "user-tls");
    assert!(queue.is_leader(&lane));
}

/// The file of the server's certificate (self-signed: it is its own root).
async fn server_certificate(admin: &Client) -> String {
    let path: String = admin
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        std::fs::read_to_string(&path).is_ok_and(|pem| pem.contains("BEGIN CERTIFICATE")),
        "cannot read the server's certificate at {path}"
    );
    path
}

// ---------------------------------------------------------------------------------------------
// Tests

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn require_encrypts_every_session_of_the_queue_and_the_queue_works_through_them() {
    let (admin, schema) = server("require_encrypts_every_session").await;
    let queue = queue(&with(&schema.url, "sslmode=require")).await.unwrap();
    round_trip(&queue).await;

    let (total, encrypted) = sessions(&admin, &queue).await;
    // At least one pooled session and the leader's.
    assert!(total >= 2, "{total} sessions");
    assert_eq!(encrypted, total);
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn prefer_and_the_default_encrypt_when_the_server_offers_tls_and_disable_does_not() {
    let (admin, schema) = server("prefer_and_the_default_encrypt").await;
    for (params, tls) in [
        (None, true),
        (Some("sslmode=prefer"), true),
        (Some("sslmode=disable"), false),
    ] {
        let url = params.map_or_else(|| schema.url.clone(), |p| with(&schema.url, p));
        let queue = queue(&url).await.unwrap();
        queue.ping().await.unwrap();
        let (total, encrypted) = sessions(&admin, &queue).await;
        assert!(total >= 1, "{params:?}: no session");
        let expected = if tls { total } else { 0 };
        assert_eq!(encrypted, expected, "{params:?}: {encrypted} of {total}");
    }
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn verify_ca_accepts_the_server_certificate_when_it_is_the_trusted_root() {
    let (admin, schema) = server("verify_ca_accepts").await;
    let root = server_certificate(&admin).await;
    let url = with(
        &schema.url,
        &format!("sslmode=verify-ca&sslrootcert={root}"),
    );
    let queue = queue(&url).await.unwrap();
    round_trip(&queue).await;
    let (total, encrypted) = sessions(&admin, &queue).await;
    assert!(total >= 2, "{total} sessions");
    assert_eq!(encrypted, total);
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn verify_modes_refuse_a_certificate_no_trusted_root_signed() {
    let (_admin, schema) = server("verify_full_refuses_an_unknown_issuer").await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, UNRELATED_ROOT).unwrap();
    for mode in ["verify-full", "verify-ca", "require"] {
        let params = format!("sslmode={mode}&sslrootcert={}", root.display());
        let error = refused(&with(&schema.url, &params)).await;
        assert!(
            error.contains("TLS handshake") && error.contains("invalid peer certificate"),
            "{mode}: {error}"
        );
        assert!(error.contains("UnknownIssuer"), "{mode}: {error}");
    }
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn verify_full_refuses_a_trusted_certificate_issued_for_another_host() {
    let (admin, schema) = server("verify_full_refuses_another_host").await;
    assert_names_the_server_by_ip_address(&schema);
    let root = server_certificate(&admin).await;
    let params = format!("sslmode=verify-full&sslrootcert={root}");
    let error = refused(&with(&schema.url, &params)).await;
    assert!(
        error.contains("TLS handshake") && error.contains("not valid for name"),
        "{error}"
    );
    schema.drop().await;
}

#[cfg_attr(not(postgres_tests), ignore = "needs RELAY_TEST_POSTGRES_URL")]
#[tokio::test]
async fn verify_full_with_the_system_roots_refuses_the_self_signed_certificate() {
    let (_admin, schema) = server("verify_full_with_the_system_roots").await;
    // Refused as not signed by a trusted root, or, where the system trusts the certificate
    // (Debian links it into /etc/ssl/certs), as issued for another host.
    assert_names_the_server_by_ip_address(&schema);
    let error = refused(&with(&schema.url, "sslmode=verify-full")).await;
    assert!(
        error.contains("TLS handshake") && error.contains("invalid peer certificate"),
        "{error}"
    );
    schema.drop().await;
}

/// The tests of host-name checks need the URL to name the server by IP address, for which
/// Debian's self-signed certificate (issued for a host name) is never valid. With a host name
/// they cannot show anything, and say so by failing rather than passing silently.
fn assert_names_the_server_by_ip_address(schema: &Schema) {
    let config: tokio_postgres::Config = schema.url.parse().unwrap();
    let on_ip = config
        .get_hosts()
        .iter()
        .all(|host| matches!(host, Host::Tcp(name) if name.parse::<std::net::IpAddr>().is_ok()));
    assert!(
        on_ip,
        "{} must name the server by IP address (as .ci/postgres.sh does) for this test",
        crate::support::postgres::URL_VAR
    );
}
