//! The process's TLS cryptography: rustls with the *ring* provider, for the Heap client
//! (reqwest) and the Postgres queue's connections alike. It owns installing that provider as the
//! process default, and nothing else: certificate checks stay with their callers.
//!
//! Why ring: rustls' default provider, aws-lc-rs, builds the AWS-LC C library (aws-lc-sys):
//! about 40 s of CPU, a ninth of a clean release build here, and a CMake-or-cc step of its own;
//! ring builds a few C and assembly files and offers a client the same cipher suites (TLS 1.2
//! and 1.3) and certificate signatures (ECDSA, RSA, Ed25519). What it lacks is the hybrid
//! post-quantum key exchange (X25519MLKEM768) that rustls prefers with aws-lc-rs: sessions agree
//! on X25519 instead. See "Build time" in BENCHMARKS.md.
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
