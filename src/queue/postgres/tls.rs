//! TLS for every connection: libpq's `sslmode` and `sslrootcert` over rustls (see [`super`]).
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, so the URL's `sslmode`
//! and `sslrootcert` are taken out of it here and the rest is handed over.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::QueueError;

/// `sslmode` and `sslrootcert` as the URL's query spelled them.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Requested {
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
}

/// libpq's `sslmode`, but `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where the trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Roots {
    /// The system's CA certificates, or the bundled Mozilla roots where it has none.
    System,
    /// `sslrootcert=PATH`: the PEM certificates in that file, and only those.
    File(String),
}

/// What is checked of the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Check {
    /// Nothing: encrypted, but anyone on the path could pose as the server.
    Nothing,
    /// Signed by a trusted root, whatever host name it names (`verify-ca`).
    Chain(Roots),
    /// Signed by a trusted root and issued for the host connected to (`verify-full`).
    Full(Roots),
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Tls {
    pub(super) mode: Mode,
    pub(super) check: Check,
}

fn invalid(message: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(format!("postgres_url: {message}"))
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL's query; a key=value
/// connection string is returned as it is (tokio-postgres reads its `sslmode`).
pub(super) fn take_params(url: &str) -> Result<(String, Requested), QueueError> {
    let mut requested = Requested::default();
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        return Ok((url.to_owned(), requested));
    };
    // Where tokio-postgres looks: the query starts at the first `?` after the credentials,
    // which end at the first `@`.
    let after_credentials = url.len() - rest.len() + rest.find('@').map_or(0, |at| at + 1);
    let Some(query_at) = url[after_credentials..]
        .find('?')
        .map(|at| after_credentials + at)
    else {
        return Ok((url.to_owned(), requested));
    };
    let mut kept = Vec::new();
    for pair in url[query_at + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match decode(key).as_deref() {
            Some("sslmode") => &mut requested.sslmode,
            Some("sslrootcert") => &mut requested.sslrootcert,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        *slot = Some(
            decode(value)
                .ok_or_else(|| invalid("sslmode or sslrootcert is not percent-encoded UTF-8"))?,
        );
    }
    let mut stripped = url[..query_at].to_owned();
    if !kept.is_empty() {
        stripped.push('?');
        stripped.push_str(&kept.join("&"));
    }
    Ok((stripped, requested))
}

/// Percent-decoding as tokio-postgres does it (`+` stays `+`).
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit));
        match (bytes[i], hex) {
            (b'%', Some(hex)) => {
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

impl Tls {
    /// What the URL asks for; `parsed` is the `sslmode` tokio-postgres read (the default,
    /// `prefer`, unless a key=value string set it).
    pub(super) fn resolve(requested: Requested, parsed: WireMode) -> Result<Self, QueueError> {
        let roots = match requested.sslrootcert.as_deref() {
            None | Some("") => None,
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(path.to_owned())),
        };
        let mode = match requested.sslmode.as_deref() {
            Some("disable") => Mode::Disable,
            Some("prefer") => Mode::Prefer,
            Some("require") => Mode::Require,
            Some("verify-ca") => Mode::VerifyCa,
            Some("verify-full") => Mode::VerifyFull,
            Some("allow") => {
                return Err(invalid(
                    "sslmode=allow is not supported (prefer, require, verify-ca, verify-full)",
                ));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "invalid sslmode {other:?} (disable, prefer, require, verify-ca, \
                     verify-full)"
                )));
            }
            // As libpq: naming the system's roots asks for a full check.
            None if roots == Some(Roots::System) => Mode::VerifyFull,
            None => match parsed {
                WireMode::Disable => Mode::Disable,
                WireMode::Require => Mode::Require,
                _ => Mode::Prefer,
            },
        };
        if roots == Some(Roots::System) && mode != Mode::VerifyFull {
            return Err(invalid(
                "sslrootcert=system needs sslmode=verify-full (or no sslmode)",
            ));
        }
        let check = match (mode, roots) {
            (Mode::Disable, _) => Check::Nothing,
            (Mode::VerifyFull, roots) => Check::Full(roots.unwrap_or(Roots::System)),
            (Mode::VerifyCa, roots) => Check::Chain(roots.unwrap_or(Roots::System)),
            // As libpq: a root certificate named makes `prefer` and `require` check the
            // chain too.
            (Mode::Prefer | Mode::Require, Some(roots)) => Check::Chain(roots),
            (Mode::Prefer | Mode::Require, None) => Check::Nothing,
        };
        Ok(Self { mode, check })
    }

    /// The `sslmode` tokio-postgres negotiates with: the verify modes require TLS.
    pub(super) fn wire_mode(&self) -> WireMode {
        match self.mode {
            Mode::Disable => WireMode::Disable,
            Mode::Prefer => WireMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => WireMode::Require,
        }
    }

    /// The connector for the pool and the leader's session; loads the roots once.
    pub(super) fn connector(&self) -> Result<MakeRustlsConnect, QueueError> {
        // The same provider as the Heap client's (ring, or one installed before).
        let provider = crate::tls::provider();
        let verifier: Arc<dyn ServerCertVerifier> = match &self.check {
            Check::Nothing => Arc::new(Unverified(Arc::clone(&provider))),
            Check::Chain(roots) => Arc::new(ChainOnly(webpki(roots, &provider)?)),
            Check::Full(roots) => webpki(roots, &provider)?,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

fn webpki(
    roots: &Roots,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, QueueError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(load(roots)?), Arc::clone(provider))
        .build()
        .map_err(|e| invalid(format!("TLS roots: {e}")))
}

fn load(roots: &Roots) -> Result<RootCertStore, QueueError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
            }
            if store.is_empty() {
                return Err(invalid(format!("sslrootcert {path}: no certificate in it")));
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    errors = ?found.errors,
                    "no system CA certificates; checking the postgres server against the \
                     bundled Mozilla roots"
                );
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
        }
    }
    Ok(store)
}

/// `prefer` and `require`: any certificate goes, but the handshake must still be signed
/// by its key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full check but for the host name. webpki checks the chain (validity
/// dates included) before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requested(sslmode: Option<&str>, sslrootcert: Option<&str>) -> Requested {
        Requested {
            sslmode: sslmode.map(str::to_owned),
            sslrootcert: sslrootcert.map(str::to_owned),
        }
    }

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_query_and_the_rest_kept() {
        let (url, taken) = take_params(
            "postgres://u:p@db:5432/relay?options=-csearch_path%3Dx&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca.pem&application_name=a",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p@db:5432/relay?options=-csearch_path%3Dx&application_name=a"
        );
        assert_eq!(taken, requested(Some("verify-full"), Some("/etc/ca.pem")));

        let (url, taken) = take_params("postgresql://db/relay?sslmode=require").unwrap();
        assert_eq!(url, "postgresql://db/relay");
        assert_eq!(taken, requested(Some("require"), None));
    }

    #[test]
    fn urls_without_those_parameters_and_key_value_strings_pass_unchanged() {
        for url in [
            "postgres://u:p@db/relay",
            "postgres://u:p@db/relay?connect_timeout=3",
            "postgres://u:p?ss@db/relay",
            "host=db user=relay sslmode=require",
        ] {
            let (same, taken) = take_params(url).unwrap();
            assert_eq!(same, url);
            assert_eq!(taken, Requested::default());
        }
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_start_the_query() {
        let (url, taken) = take_params("postgres://u:p?x@db/relay?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u:p?x@db/relay");
        assert_eq!(taken, requested(Some("disable"), None));
    }

    #[test]
    fn sslmodes_resolve_as_in_libpq() {
        use Check::{Chain, Full, Nothing};
        let file = || Roots::File("/ca.pem".to_owned());
        let cases = [
            (None, None, WireMode::Prefer, Mode::Prefer, Nothing),
            (None, None, WireMode::Require, Mode::Require, Nothing),
            (None, None, WireMode::Disable, Mode::Disable, Nothing),
            (
                Some("disable"),
                Some("/ca.pem"),
                WireMode::Prefer,
                Mode::Disable,
                Nothing,
            ),
            (
                Some("prefer"),
                None,
                WireMode::Prefer,
                Mode::Prefer,
                Nothing,
            ),
            (
                Some("require"),
                None,
                WireMode::Prefer,
                Mode::Require,
                Nothing,
            ),
            (
                Some("require"),
                Some(""),
                WireMode::Prefer,
                Mode::Require,
                Nothing,
            ),
            (
                Some("require"),
                Some("/ca.pem"),
                WireMode::Prefer,
                Mode::Require,
                Chain(file()),
            ),
            (
                Some("prefer"),
                Some("/ca.pem"),
                WireMode::Prefer,
                Mode::Prefer,
                Chain(file()),
            ),
            (
                Some("verify-ca"),
                None,
                WireMode::Prefer,
                Mode::VerifyCa,
                Chain(Roots::System),
            ),
            (
                Some("verify-ca"),
                Some("/ca.pem"),
                WireMode::Prefer,
                Mode::VerifyCa,
                Chain(file()),
            ),
            (
                Some("verify-full"),
                None,
                WireMode::Prefer,
                Mode::VerifyFull,
                Full(Roots::System),
            ),
            (
                Some("verify-full"),
                Some("/ca.pem"),
                WireMode::Prefer,
                Mode::VerifyFull,
                Full(file()),
            ),
            (
                Some("verify-full"),
                Some("system"),
                WireMode::Prefer,
                Mode::VerifyFull,
                Full(Roots::System),
            ),
            (
                None,
                Some("system"),
                WireMode::Prefer,
                Mode::VerifyFull,
                Full(Roots::System),
            ),
        ];
        for (sslmode, sslrootcert, parsed, mode, check) in cases {
            let tls = Tls::resolve(requested(sslmode, sslrootcert), parsed).unwrap();
            assert_eq!(
                tls,
                Tls { mode, check },
                "sslmode={sslmode:?} sslrootcert={sslrootcert:?}"
            );
        }
    }

    #[test]
    fn verify_modes_require_tls_on_the_wire() {
        for (sslmode, wire) in [
            ("disable", WireMode::Disable),
            ("prefer", WireMode::Prefer),
            ("require", WireMode::Require),
            ("verify-ca", WireMode::Require),
            ("verify-full", WireMode::Require),
        ] {
            let tls = Tls::resolve(requested(Some(sslmode), None), WireMode::Prefer).unwrap();
            assert_eq!(tls.wire_mode(), wire, "{sslmode}");
        }
    }

    #[test]
    fn unsupported_or_contradictory_settings_are_refused_by_name() {
        for (sslmode, sslrootcert, expected) in [
            (Some("allow"), None, "sslmode=allow is not supported"),
            (Some("verify_full"), None, "invalid sslmode \"verify_full\""),
            (Some("require"), Some("system"), "sslrootcert=system needs"),
            (
                Some("verify-ca"),
                Some("system"),
                "sslrootcert=system needs",
            ),
        ] {
            let error = Tls::resolve(requested(sslmode, sslrootcert), WireMode::Prefer)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn a_missing_or_empty_root_certificate_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem").display().to_string();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let empty = empty.display().to_string();
        for path in [&missing, &empty] {
            let tls = Tls {
                mode: Mode::VerifyFull,
                check: Check::Full(Roots::File(path.clone())),
            };
            let error = tls.connector().err().unwrap().to_string();
            assert!(error.contains(&format!("sslrootcert {path}")), "{error}");
        }
    }

    #[test]
    fn the_system_roots_load() {
        let tls = Tls {
            mode: Mode::VerifyFull,
            check: Check::Full(Roots::System),
        };
        assert!(!load(&Roots::System).unwrap().is_empty());
        tls.connector().unwrap();
    }

    #[test]
    fn percent_decoding_matches_tokio_postgres() {
        assert_eq!(decode("%2Fa%2fb").as_deref(), Some("/a/b"));
        assert_eq!(decode("a+b%").as_deref(), Some("a+b%"));
        assert_eq!(decode("%zz%4").as_deref(), Some("%zz%4"));
        assert_eq!(decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(decode("%FF"), None);
    }
}
