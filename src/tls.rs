//! The process's TLS cryptography: rustls with the *ring* provider, for the Heap client
//! (reqwest) and the Postgres queue's connections alike. It owns installing that provider as the
//! process default, and nothing else: certificate checks stay with their callers.
//!
//! Why ring: rustls' default provider, aws-lc-rs, builds the AWS-LC C library (aws-lc-sys),
//! which took about a third of a clean release build on a 2-core machine; ring builds in seconds
//! and offers the same suites (TLS 1.2 and 1.3, ECDSA, RSA, Ed25519) for a client. See the
//! "Build time" section of BENCHMARKS.md.
//!
//! reqwest 0.13 names no ring feature: it is built with `rustls-no-provider`, and then builds a
//! client only once a process default is installed (it panics otherwise). So every reqwest
//! client in the crate is built through [`http_client`], or after [`provider`] has run, as
//! `main` does first thing.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The process's default provider, ring installed as that default when none was yet.
///
/// A default installed before (by an embedding program, say) is kept and returned.
pub fn provider() -> Arc<CryptoProvider> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Arc::clone(installed);
    }
    // `Err` means another thread installed one between the two calls; that one stands.
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// `reqwest::Client::builder()`, with the provider installed first (see the module's note).
pub fn http_client() -> reqwest::ClientBuilder {
    provider();
    reqwest::Client::builder()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_provider_is_ring_and_a_client_builds_with_it() {
        let provider = provider();
        let ring = rustls::crypto::ring::default_provider();
        let names = |p: &CryptoProvider| {
            p.cipher_suites
                .iter()
                .map(|s| format!("{:?}", s.suite()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&provider), names(&ring));
        assert!(CryptoProvider::get_default().is_some());
        http_client().build().unwrap();
    }
}
