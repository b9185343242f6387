//! TLS for the client and peer ports, configured as etcd 3.5 configures it (its "transport
//! security model"): `https://` listen URLs served with `--cert-file/--key-file` (client) and
//! `--peer-cert-file/--peer-key-file` (peer); `--*client-cert-auth` plus a trusted CA for mutual
//! TLS, CRLs, allowed CN/hostname, self-signed auto-TLS, cipher suites and protocol versions.
//!
//! All cryptography and certificate parsing is rustls's, webpki's, x509-parser's and rcgen's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    SupportedProtocolVersion,
};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// How long a client has to finish its TLS handshake; a stalled one is dropped without holding
/// up anyone else.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One port's TLS files and policies (etcd's `transport.TLSInfo`).
#[derive(Clone, Debug, Default)]
pub struct TlsInfo {
    /// Certificate presented by the server, and by this member when it dials peers.
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    pub key_file: Option<PathBuf>,
    /// CA certificates that client certificates (and, for peers, server certificates) must
    /// chain to.
    pub trusted_ca_file: Option<PathBuf>,
    /// Require and verify client certificates.
    pub client_cert_auth: bool,
    /// Revoked certificates.
    pub crl_file: Option<PathBuf>,
    /// A client certificate's Subject CommonName must be this.
    pub allowed_cn: Option<String>,
    /// A client certificate must be valid for this host name (SAN DNS name or IP).
    pub allowed_hostname: Option<String>,
    /// Auto-TLS: as a client, accept any server certificate (etcd's `InsecureSkipVerify` for
    /// self-signed certificates, which no CA can vouch for).
    pub insecure_skip_verify: bool,
    /// The certificate this member presents when it dials, instead of `cert_file`
    /// (`--peer-client-cert-file`, etcd 3.5's `TLSInfo.ClientCertFile`).
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (`--peer-client-key-file`).
    pub client_key_file: Option<PathBuf>,
}

impl TlsInfo {
    /// No certificate and key: the port cannot serve TLS (etcd's `TLSInfo.Empty`).
    pub fn is_empty(&self) -> bool {
        self.cert_file.is_none() && self.key_file.is_none()
    }

    /// The client port's settings from the flags.
    pub fn client(cfg: &Config) -> Self {
        TlsInfo {
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            trusted_ca_file: cfg.trusted_ca_file.clone(),
            client_cert_auth: cfg.client_cert_auth,
            crl_file: cfg.client_crl_file.clone(),
            allowed_cn: None,
            allowed_hostname: cfg.client_cert_allowed_hostname.clone(),
            insecure_skip_verify: false,
            // Nothing in a member dials its own client port: see `--client-cert-file` in
            // `config::IGNORED`.
            client_cert_file: None,
            client_key_file: None,
        }
    }

    /// The peer port's settings from the flags.
    pub fn peer(cfg: &Config) -> Self {
        TlsInfo {
            cert_file: cfg.peer_cert_file.clone(),
            key_file: cfg.peer_key_file.clone(),
            trusted_ca_file: cfg.peer_trusted_ca_file.clone(),
            client_cert_auth: cfg.peer_client_cert_auth,
            crl_file: cfg.peer_crl_file.clone(),
            allowed_cn: cfg.peer_cert_allowed_cn.clone(),
            allowed_hostname: cfg.peer_cert_allowed_hostname.clone(),
            insecure_skip_verify: false,
            client_cert_file: cfg.peer_client_cert_file.clone(),
            client_key_file: cfg.peer_client_key_file.clone(),
        }
    }
}

/// Protocol versions and cipher suites shared by both ports (`--tls-min-version`,
/// `--tls-max-version`, `--cipher-suites`).
#[derive(Clone, Debug)]
pub struct TlsCommon {
    versions: Vec<&'static SupportedProtocolVersion>,
    provider: Arc<CryptoProvider>,
}

fn parse_version(flag: &str, v: &str) -> Result<Option<u8>, String> {
    match v {
        "" => Ok(None),
        "TLS1.2" => Ok(Some(2)),
        "TLS1.3" => Ok(Some(3)),
        "TLS1.0" | "TLS1.1" => Err(format!(
            "{flag}={v} is not supported: MetaStore's TLS (rustls) implements TLS1.2 and TLS1.3 only"
        )),
        _ => Err(format!(
            "unexpected TLS version {v:?} (must be one of: TLS1.0, TLS1.1, TLS1.2, TLS1.3)"
        )),
    }
}

/// Go's names for the TLS 1.2 suites it knows that rustls does not implement (CBC, RC4, 3DES,
/// static RSA key exchange): named as unsupported rather than unknown.
const GO_ONLY_SUITES: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

impl TlsCommon {
    /// Versions and suites from the flags, checked as etcd checks them.
    ///
    /// Errors: an unknown version or suite; TLS1.0/1.1 or a CBC/RC4/3DES suite (not in
    /// rustls); min above max; suites with TLS1.3 only (TLS1.3 suites are not configurable).
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        let min = parse_version("--tls-min-version", &cfg.tls_min_version)?.unwrap_or(2);
        let max = parse_version("--tls-max-version", &cfg.tls_max_version)?;
        if max.is_some_and(|max| min > max) {
            return Err(format!(
                "min version ({}) is greater than max version ({})",
                cfg.tls_min_version, cfg.tls_max_version
            ));
        }
        let suites: Vec<&str> = cfg
            .cipher_suites
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if min == 3 && !suites.is_empty() {
            return Err(format!(
                "cipher suites {suites:?} cannot be configured when only TLS1.3 is enabled"
            ));
        }
        let max = max.unwrap_or(3);
        let mut versions = Vec::new();
        if min <= 2 && max >= 2 {
            versions.push(&rustls::version::TLS12);
        }
        if max >= 3 {
            versions.push(&rustls::version::TLS13);
        }
        let mut provider = rustls::crypto::ring::default_provider();
        if !suites.is_empty() {
            // As Go: the list restricts TLS 1.2 suites; TLS 1.3's are always all enabled.
            let mut chosen = Vec::new();
            for name in &suites {
                let found = provider.cipher_suites.iter().find(|s| {
                    // rustls spells TLS 1.3 suites TLS13_*, Go and IANA TLS_*.
                    let iana = format!("{:?}", s.suite()).replacen("TLS13_", "TLS_", 1);
                    iana == *name || iana.strip_suffix("_SHA256") == Some(name)
                });
                match found {
                    Some(s) if s.tls13().is_none() => chosen.push(*s),
                    // etcd 3.5 knows Go's TLS 1.3 names too; Go (and rustls) always enable
                    // every TLS 1.3 suite, so naming one changes nothing.
                    Some(_) => {}
                    None if GO_ONLY_SUITES.contains(name) => {
                        return Err(format!(
                            "--cipher-suites: {name} is not supported: MetaStore's TLS (rustls) offers only AEAD suites with ECDHE"
                        ))
                    }
                    None => return Err(format!("unexpected TLS cipher suite {name:?}")),
                }
            }
            let tls13: Vec<_> = provider
                .cipher_suites
                .iter()
                .filter(|s| s.tls13().is_some())
                .copied()
                .collect();
            if chosen.is_empty() {
                // Only TLS 1.3 names: as in Go, no TLS 1.2 handshake can agree on a suite.
                versions.retain(|v| v.version != rustls::ProtocolVersion::TLSv1_2);
                if versions.is_empty() {
                    return Err(format!(
                        "--cipher-suites {suites:?} name only TLS1.3 suites, and TLS1.3 is not enabled"
                    ));
                }
            }
            provider.cipher_suites = tls13.into_iter().chain(chosen).collect();
        }
        Ok(TlsCommon {
            versions,
            provider: Arc::new(provider),
        })
    }
}

/// Whether `url` is served and dialed over TLS: `https://` or `unixs://`.
pub fn is_tls(url: &url::Url) -> bool {
    matches!(url.scheme(), "https" | "unixs")
}

/// Checks the TLS flags without touching files (called at start-up, after
/// [`Config::validate`]).
///
/// Errors: as [`TlsCommon::from_config`]; `--peer-cert-allowed-cn` together with
/// `--peer-cert-allowed-hostname` (etcd allows one).
pub fn validate(cfg: &Config) -> Result<(), String> {
    TlsCommon::from_config(cfg)?;
    if let (Some(cn), Some(host)) = (&cfg.peer_cert_allowed_cn, &cfg.peer_cert_allowed_hostname) {
        return Err(format!(
            "AllowedCN and AllowedHostname are mutually exclusive (cn={cn:?}, hostname={host:?})"
        ));
    }
    for (cert, key) in [
        (&cfg.peer_client_cert_file, &cfg.peer_client_key_file),
        (&cfg.client_cert_file, &cfg.client_key_file),
    ] {
        if cert.is_none() != key.is_none() {
            // etcd 3.5 `TLSInfo.baseConfig`.
            return Err(format!(
                "ClientKeyFile and ClientCertFile must both be present or both absent: key: {:?}, cert: {:?}]",
                key.as_deref().unwrap_or(Path::new("")),
                cert.as_deref().unwrap_or(Path::new(""))
            ));
        }
    }
    if cfg.self_signed_cert_validity == 0 {
        return Err("--self-signed-cert-validity must be at least 1 year".into());
    }
    Ok(())
}

/// Why TLS cannot be set up ([`setup`] and the functions it calls). Each variant's text is
/// the outermost message; the cause, when there is one, is its `source`, printed after it by
/// `{:#}` as "message: cause".
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `--tls-min-version`, `--tls-max-version` or `--cipher-suites` that cannot work.
    #[error("{0}")]
    Common(String),
    /// A certificate file that cannot be read or parsed.
    #[error("cannot read certificates from {}", path.display())]
    ReadCerts {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        error: rustls::pki_types::pem::Error,
    },
    /// A certificate file without any certificate.
    #[error("no certificate in {}", .0.display())]
    NoCertificate(PathBuf),
    /// A key file that cannot be read or parsed.
    #[error("cannot read a private key from {}", path.display())]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        error: rustls::pki_types::pem::Error,
    },
    /// A CA file with a certificate rustls refuses as a trust root.
    #[error("bad CA certificate in {}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        error: rustls::Error,
    },
    /// A CRL file that cannot be read.
    #[error("cannot read {}", path.display())]
    ReadCrl {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// A CRL file with a malformed PEM block.
    #[error("bad CRL in {}", path.display())]
    BadCrl {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        error: rustls::pki_types::pem::Error,
    },
    /// A port with TLS but without certificate and key files.
    #[error("KeyFile and CertFile are not presented")]
    NotPresented,
    /// `--client-cert-auth` (or the peer one) without a trusted CA file.
    #[error("client certificate authentication needs a trusted CA file")]
    NoTrustedCa,
    /// The client certificate verifier cannot be built (for example from the CRLs).
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The key file's key is not the certificate's.
    #[error("certificate and key do not match")]
    KeyMismatch(#[source] rustls::Error),
    /// rustls refused the configuration (protocol versions).
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// Auto-TLS: the certificate directory cannot be created.
    #[error("cannot create {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// Auto-TLS: the self-signed certificate cannot be made.
    #[error(transparent)]
    SelfCert(#[from] rcgen::Error),
    /// Auto-TLS: the certificate or key file cannot be written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// An `https://` client URL without certificate and key.
    #[error("TLS key/cert (--cert-file, --key-file) must be provided for client url {0} with HTTPS scheme")]
    ClientUrlWithoutCert(url::Url),
    /// An `https://` peer URL without certificate and key; the text names its host.
    #[error("cannot listen on TLS for {0}: KeyFile and CertFile are not presented")]
    PeerUrlWithoutCert(String),
    /// An `https://` metrics URL without client certificate and key.
    #[error(
        "client TLS key/cert (--cert-file, --key-file) must be provided for metrics secure url"
    )]
    MetricsUrlWithoutCert,
    /// The client port's TLS cannot be set up (the cause).
    #[error("client TLS")]
    Client(#[source] Box<TlsError>),
    /// The peer port's TLS, or the peer dialing configuration, cannot be set up (the cause).
    #[error("peer TLS")]
    Peer(#[source] Box<TlsError>),
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|error| TlsError::ReadCerts {
            path: path.to_path_buf(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| TlsError::ReadKey {
        path: path.to_path_buf(),
        error,
    })
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|error| TlsError::BadCa {
            path: path.to_path_buf(),
            error,
        })?;
    }
    Ok(Arc::new(roots))
}

/// A CRL file in PEM or DER, as Go's `x509.ParseCRL` takes either.
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|error| TlsError::ReadCrl {
        path: path.to_path_buf(),
        error,
    })?;
    let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|error| TlsError::BadCrl {
            path: path.to_path_buf(),
            error,
        })?;
    Ok(if pem.is_empty() {
        vec![CertificateRevocationListDer::from(bytes)]
    } else {
        pem
    })
}

/// Server side: the TLS acceptor for a port.
///
/// Errors: unreadable or malformed files; a key not matching the certificate.
pub fn server_config(info: &TlsInfo, common: &TlsCommon) -> Result<TlsAcceptor, TlsError> {
    let (Some(cert), Some(key)) = (&info.cert_file, &info.key_file) else {
        return Err(TlsError::NotPresented);
    };
    let builder = rustls::ServerConfig::builder_with_provider(common.provider.clone())
        .with_protocol_versions(&common.versions)?;
    let builder = match (&info.trusted_ca_file, info.client_cert_auth) {
        (Some(ca), true) => {
            let mut verifier = WebPkiClientVerifier::builder_with_provider(
                load_roots(ca)?,
                common.provider.clone(),
            );
            if let Some(crl) = &info.crl_file {
                // etcd checks the presented certificate's serial against the CRL; a CRL from
                // another issuer says nothing about it.
                verifier = verifier
                    .with_crls(load_crls(crl)?)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status();
            }
            let verifier = verifier.build().map_err(TlsError::Verifier)?;
            builder.with_client_cert_verifier(Arc::new(Restricted {
                inner: verifier,
                trusted_roots: load_certs(ca)?,
                allowed_cn: info.allowed_cn.clone(),
                allowed_hostname: info.allowed_hostname.clone(),
            }))
        }
        (None, true) => return Err(TlsError::NoTrustedCa),
        (_, false) => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(TlsError::KeyMismatch)?;
    // gRPC clients (grpc-go ≥ 1.67 enforces it) negotiate HTTP/2 through ALPN; HTTP/1.1-only
    // clients (`curl --http1.1` on the JSON gateway and the HTTP endpoints) get HTTP/1.1, as
    // from Go's `http.Server` (`NextProtos: ["h2", "http/1.1"]`). rustls picks the server's
    // first protocol the client offers.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Client side (dialing peers): the peer certificate as client certificate, the peer CA as
/// trust root, or no verification for auto-TLS.
///
/// Errors: unreadable or malformed files.
pub fn client_config(
    info: &TlsInfo,
    common: &TlsCommon,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(common.provider.clone())
        .with_protocol_versions(&common.versions)?;
    let builder = if info.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipServerVerification(
                common.provider.clone(),
            )))
    } else if let Some(ca) = &info.trusted_ca_file {
        builder.with_root_certificates(load_roots(ca)?)
    } else {
        // Without a CA file Go falls back to the system roots; MetaStore ships none, so only
        // an explicit CA (or auto-TLS) can verify peers.
        builder.with_root_certificates(RootCertStore::empty())
    };
    // etcd 3.5: a dialing member presents `--peer-client-cert-file` when given, else its
    // server certificate.
    let identity = match (&info.client_cert_file, &info.client_key_file) {
        (Some(cert), Some(key)) => (Some(cert), Some(key)),
        _ => (info.cert_file.as_ref(), info.key_file.as_ref()),
    };
    let mut config = match identity {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(TlsError::KeyMismatch)?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// `--peer-cert-allowed-cn` / `--*-cert-allowed-hostname` on top of chain verification.
#[derive(Debug)]
struct Restricted {
    inner: Arc<dyn ClientCertVerifier>,
    /// The trusted CA certificates themselves: Go accepts a client presenting one of them (a
    /// chain of one trusted root), which webpki refuses as "CA used as end entity".
    trusted_roots: Vec<CertificateDer<'static>>,
    allowed_cn: Option<String>,
    allowed_hostname: Option<String>,
}

impl ClientCertVerifier for Restricted {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            // Go's `x509.Certificate.Verify` (which etcd uses) takes a certificate found in the
            // root pool as a complete chain; etcd's own e2e fixtures use a self-signed CA as
            // client certificate. The TLS handshake has proven the client holds its key.
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(e)))
                if format!("{e:?}").contains("CaUsedAsEndEntity")
                    && self.trusted_roots.iter().any(|r| r == end_entity)
                    && currently_valid(end_entity, now) =>
            {
                ClientCertVerified::assertion()
            }
            other => other?,
        };
        if let Some(allowed) = &self.allowed_cn {
            let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
                .map_err(|_| rustls::Error::General("unparsable client certificate".into()))?;
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|a| a.as_str().ok());
            if cn != Some(allowed.as_str()) {
                return Err(CLIENT_CERT_AUTH_FAILED);
            }
        }
        if let Some(allowed) = &self.allowed_hostname {
            let name = ServerName::try_from(allowed.as_str())
                .map_err(|_| rustls::Error::General("bad allowed hostname".into()))?;
            let ok = webpki::EndEntityCert::try_from(end_entity)
                .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok());
            if !ok {
                return Err(CLIENT_CERT_AUTH_FAILED);
            }
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Auto-TLS peers trust any certificate, as etcd's self-signed `InsecureSkipVerify`; the
/// handshake signatures are still checked, so the peer must hold the certificate's key.
#[derive(Debug)]
struct SkipServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipServerVerification {
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

/// Auto-TLS: a self-signed certificate and key under `dir` (`cert.pem`, `key.pem`), made
/// once and reused on restart (etcd's `transport.SelfCert`), valid for `hosts` (the listen
/// URLs' hosts) for `years`.
///
/// Errors: the directory or files cannot be written.
pub fn self_cert(dir: &Path, hosts: &[String], years: u32) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert_path.exists() && key_path.exists() {
        tracing::info!(path = %cert_path.display(), "using the existing self-signed certificate");
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(|error| TlsError::CreateDir {
        path: dir.to_path_buf(),
        error,
    })?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    for host in hosts {
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(host.clone().try_into()?),
        };
        if !params.subject_alt_names.contains(&san) {
            params.subject_alt_names.push(san);
        }
    }
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "etcd");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(365 * i64::from(years));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    // Peers present the same certificate as server and as client.
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    std::fs::write(&cert_path, cert.pem())?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)?;
        f.write_all(key.serialize_pem().as_bytes())?;
    }
    tracing::info!(path = %cert_path.display(), "created cert file");
    tracing::info!(path = %key_path.display(), "created key file");
    Ok((cert_path, key_path))
}

/// The client-side TLS for dialing `https://` peers, set once at start-up: every peer client
/// (Raft transport, snapshot sender, lease forwarding, membership fetches) uses it.
static PEER_CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Installs the peer dialing configuration (first call wins; a process runs one member).
pub fn set_peer_client(config: Arc<rustls::ClientConfig>) {
    let _ = PEER_CLIENT.set(config);
}

/// The peer dialing configuration, when peer TLS is configured.
pub fn peer_client() -> Option<Arc<rustls::ClientConfig>> {
    PEER_CLIENT.get().cloned()
}

/// Whether `der` is within its validity period at `now`.
fn currently_valid(der: &CertificateDer<'_>, now: UnixTime) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| {
        let now = now.as_secs() as i64;
        let validity = cert.validity();
        validity.not_before.timestamp() <= now && now <= validity.not_after.timestamp()
    })
}

/// A client certificate that chains to a trusted CA but fails `--peer-cert-allowed-cn` or
/// `--peer-cert-allowed-hostname`. rustls answers it with a `bad_certificate` alert, as Go
/// does for etcd's `VerifyPeerCertificate` error, and [`go_tls_error`] logs it in etcd's words.
/// Webpki checks no names on client certificates, so on the server side this error has no
/// other source.
const CLIENT_CERT_AUTH_FAILED: rustls::Error =
    rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);

/// Go's text for a TLS alert (crypto/tls `alert.go`), which etcd's logs and its e2e tests
/// quote ("remote error: tls: bad certificate").
fn go_alert_text(alert: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    match alert {
        A::CloseNotify => "close notify",
        A::UnexpectedMessage => "unexpected message",
        A::BadRecordMac => "bad record MAC",
        A::RecordOverflow => "record overflow",
        A::HandshakeFailure => "handshake failure",
        A::BadCertificate => "bad certificate",
        A::UnsupportedCertificate => "unsupported certificate",
        A::CertificateRevoked => "revoked certificate",
        A::CertificateExpired => "expired certificate",
        A::CertificateUnknown => "unknown certificate",
        A::IllegalParameter => "illegal parameter",
        A::UnknownCA => "unknown certificate authority",
        A::AccessDenied => "access denied",
        A::DecodeError => "error decoding message",
        A::DecryptError => "error decrypting message",
        A::ProtocolVersion => "protocol version not supported",
        A::InsufficientSecurity => "insufficient security level",
        A::InternalError => "internal error",
        A::UserCanceled => "user canceled",
        A::NoRenegotiation => "no renegotiation",
        A::MissingExtension => "missing extension",
        A::UnsupportedExtension => "unsupported extension",
        A::UnrecognisedName => "unrecognized name",
        A::NoApplicationProtocol => "no application protocol",
        A::CertificateRequired => "certificate required",
        other => return format!("alert({})", u8::from(other)),
    }
    .to_string()
}

/// Describes a connection error as etcd (Go) would: a TLS alert from the other side reads
/// "remote error: tls: <alert>", a client certificate refused by the allowed CN or hostname
/// reads "client certificate authentication failed"; anything else is the error chain joined
/// with ": ". `err` may wrap the rustls error at any depth (tonic, hyper, io).
pub fn go_tls_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut texts = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        match tls {
            Some(rustls::Error::AlertReceived(alert)) => {
                return format!("remote error: tls: {}", go_alert_text(*alert))
            }
            Some(e) if *e == CLIENT_CERT_AUTH_FAILED => {
                return "client certificate authentication failed".to_string()
            }
            _ => {}
        }
        let text = e.to_string();
        // h2 keeps an I/O error's kind and text only, so a rustls alert that ended an HTTP/2
        // connection arrives as rustls' text: "received fatal alert: BadCertificate".
        if let Some(alert) = text
            .split_once("received fatal alert: ")
            .and_then(|(_, name)| alert_named(name.trim()))
        {
            return format!("remote error: tls: {}", go_alert_text(alert));
        }
        if texts.last() != Some(&text) {
            texts.push(text);
        }
        next = e.source();
    }
    texts.join(": ")
}

/// The alert whose rustls name (its `Debug` form, as in "received fatal alert: BadCertificate")
/// is `name`.
fn alert_named(name: &str) -> Option<rustls::AlertDescription> {
    (0..=u8::MAX)
        .map(rustls::AlertDescription::from)
        .find(|a| format!("{a:?}") == name)
}

/// The TLS a member serves with, per port.
pub struct MemberTls {
    /// For `https://` client URLs.
    pub client: Option<TlsAcceptor>,
    /// For `https://` peer URLs.
    pub peer: Option<TlsAcceptor>,
}

fn url_hosts(urls: &[url::Url]) -> Vec<String> {
    urls.iter()
        .filter_map(|u| u.host_str())
        .map(|h| h.trim_matches(['[', ']']).to_string())
        .collect()
}

/// Auto-TLS for one port, as etcd's `ClientSelfCert`/`PeerSelfCert`: files given beat it.
fn auto_tls(
    info: TlsInfo,
    enabled: bool,
    dir: PathBuf,
    urls: &[url::Url],
    years: u32,
    what: &str,
) -> Result<TlsInfo, TlsError> {
    if !enabled {
        return Ok(info);
    }
    if !info.is_empty() {
        tracing::warn!("ignoring {what} auto TLS since certs given");
        return Ok(info);
    }
    if info.client_cert_auth || info.trusted_ca_file.is_some() || info.crl_file.is_some() {
        // etcd replaces the whole TLS info with the self-signed one.
        tracing::warn!("{what} auto TLS ignores the {what} CA, CRL and client-cert-auth settings");
    }
    let (cert, key) = self_cert(&dir, &url_hosts(urls), years)?;
    Ok(TlsInfo {
        cert_file: Some(cert),
        key_file: Some(key),
        insecure_skip_verify: true,
        ..TlsInfo::default()
    })
}

/// Checks one port's URLs against its TLS info, with etcd's warnings and errors.
fn check_urls(urls: &[url::Url], info: &TlsInfo, what: &str) -> Result<bool, TlsError> {
    let mut https = false;
    for u in urls {
        if is_tls(u) {
            https = true;
            if info.is_empty() {
                if what == "client" {
                    return Err(TlsError::ClientUrlWithoutCert(u.clone()));
                }
                return Err(TlsError::PeerUrlWithoutCert(
                    u.host_str().unwrap_or_default().to_string(),
                ));
            }
            continue;
        }
        if !info.is_empty() {
            tracing::warn!(url = %u, "scheme is HTTP while key and certificate files are present; ignoring key and certificate files");
        }
        if info.client_cert_auth {
            let flag = if what == "client" {
                "--client-cert-auth"
            } else {
                "--peer-client-cert-auth"
            };
            tracing::warn!(url = %u, "scheme is HTTP while {flag} is enabled; ignoring client cert auth for this URL");
        }
    }
    if https && info.crl_file.is_some() && !info.client_cert_auth {
        tracing::warn!(
            "the {what} CRL file is used only with {what} client certificate authentication"
        );
    }
    Ok(https)
}

/// Builds both ports' TLS from the flags: generates auto-TLS certificates under
/// `<data-dir>/fixtures/{client,peer}`, loads and checks the files, and installs the peer
/// dialing configuration.
///
/// Errors: an `https://` URL (client, peer or metrics) without certificate and key;
/// unreadable or malformed files;
/// versions or suites that cannot work.
pub fn setup(cfg: &Config, data_dir: &Path) -> Result<MemberTls, TlsError> {
    let common = TlsCommon::from_config(cfg).map_err(TlsError::Common)?;
    let years = cfg.self_signed_cert_validity;
    let client = auto_tls(
        TlsInfo::client(cfg),
        cfg.auto_tls,
        data_dir.join("fixtures").join("client"),
        &cfg.listen_client_urls,
        years,
        "client",
    )?;
    let peer = auto_tls(
        TlsInfo::peer(cfg),
        cfg.peer_auto_tls,
        data_dir.join("fixtures").join("peer"),
        &cfg.listen_peer_urls,
        years,
        "peer",
    )?;
    // etcd `createMetricsListener`: an `https://` or `unixs://` metrics URL uses the client
    // TLS settings, which it then requires.
    let metrics_tls = cfg
        .listen_metrics_urls
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(is_tls);
    if metrics_tls && client.is_empty() {
        return Err(TlsError::MetricsUrlWithoutCert);
    }
    let client_acceptor = if check_urls(&cfg.listen_client_urls, &client, "client")? || metrics_tls
    {
        tracing::info!(cert = ?client.cert_file, trusted_ca = ?client.trusted_ca_file,
            client_cert_auth = client.client_cert_auth, crl = ?client.crl_file, "starting with client TLS");
        Some(server_config(&client, &common).map_err(|e| TlsError::Client(Box::new(e)))?)
    } else {
        None
    };
    let peer_acceptor = if check_urls(&cfg.listen_peer_urls, &peer, "peer")? {
        tracing::info!(cert = ?peer.cert_file, trusted_ca = ?peer.trusted_ca_file,
            client_cert_auth = peer.client_cert_auth, crl = ?peer.crl_file, "starting with peer TLS");
        Some(server_config(&peer, &common).map_err(|e| TlsError::Peer(Box::new(e)))?)
    } else {
        None
    };
    if !peer.is_empty() {
        set_peer_client(client_config(&peer, &common).map_err(|e| TlsError::Peer(Box::new(e)))?);
    }
    Ok(MemberTls {
        client: client_acceptor,
        peer: peer_acceptor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("metastore").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn connection_errors_read_as_etcd_logs_them() {
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        );
        assert_eq!(go_tls_error(&alert), "remote error: tls: bad certificate");
        // As h2 hands it back: the text alone.
        let text = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: UnknownCA",
        );
        assert_eq!(
            go_tls_error(&text),
            "remote error: tls: unknown certificate authority"
        );
        let refused = std::io::Error::new(std::io::ErrorKind::InvalidData, CLIENT_CERT_AUTH_FAILED);
        assert_eq!(
            go_tls_error(&refused),
            "client certificate authentication failed"
        );
        let other = std::io::Error::other("connection refused");
        assert_eq!(go_tls_error(&other), "connection refused");
    }

    #[test]
    fn versions_and_suites_follow_etcd_rules() {
        let c = TlsCommon::from_config(&cfg(&[])).unwrap();
        assert_eq!(c.versions.len(), 2, "TLS1.2 and TLS1.3 by default");
        let c = TlsCommon::from_config(&cfg(&["--tls-min-version", "TLS1.3"])).unwrap();
        assert_eq!(c.versions, vec![&rustls::version::TLS13]);
        let err = TlsCommon::from_config(&cfg(&["--tls-min-version", "TLS1.0"])).unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = TlsCommon::from_config(&cfg(&[
            "--tls-min-version",
            "TLS1.3",
            "--tls-max-version",
            "TLS1.2",
        ]))
        .unwrap_err();
        assert_eq!(
            err,
            "min version (TLS1.3) is greater than max version (TLS1.2)"
        );
        let suites = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305";
        let c = TlsCommon::from_config(&cfg(&["--cipher-suites", suites])).unwrap();
        let tls12 = c
            .provider
            .cipher_suites
            .iter()
            .filter(|s| s.tls13().is_none());
        assert_eq!(tls12.count(), 2);
        assert!(c.provider.cipher_suites.iter().any(|s| s.tls13().is_some()));
        let err = TlsCommon::from_config(&cfg(&[
            "--cipher-suites",
            "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        ]))
        .unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = TlsCommon::from_config(&cfg(&[
            "--tls-min-version",
            "TLS1.3",
            "--cipher-suites",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ]))
        .unwrap_err();
        assert!(err.contains("only TLS1.3"), "{err}");
        // Go's TLS 1.3 names are accepted, as etcd 3.5 accepts them; alone they leave TLS 1.3.
        let c = TlsCommon::from_config(&cfg(&[
            "--cipher-suites",
            "TLS_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ]))
        .unwrap();
        assert_eq!(c.versions.len(), 2);
        let c = TlsCommon::from_config(&cfg(&[
            "--cipher-suites",
            "TLS_AES_256_GCM_SHA384,TLS_CHACHA20_POLY1305_SHA256",
        ]))
        .unwrap();
        assert_eq!(c.versions, vec![&rustls::version::TLS13]);
    }

    #[test]
    fn boolean_flags_and_exclusive_restrictions() {
        let c = cfg(&[
            "--client-cert-auth",
            "--peer-auto-tls=true",
            "--auto-tls=false",
        ]);
        assert!(c.client_cert_auth && c.peer_auto_tls && !c.auto_tls);
        assert_eq!(c.self_signed_cert_validity, 1);
        let c = cfg(&[
            "--peer-cert-allowed-cn",
            "a",
            "--peer-cert-allowed-hostname",
            "b",
        ]);
        assert!(validate(&c).unwrap_err().contains("mutually exclusive"));
    }

    #[test]
    fn self_cert_is_made_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
        let (cert, key) = self_cert(dir.path(), &hosts, 1).unwrap();
        let first = std::fs::read(&cert).unwrap();
        self_cert(dir.path(), &hosts, 1).unwrap();
        assert_eq!(first, std::fs::read(&cert).unwrap(), "reused on restart");
        let info = TlsInfo {
            cert_file: Some(cert),
            key_file: Some(key),
            ..TlsInfo::default()
        };
        let common = TlsCommon::from_config(&cfg(&[])).unwrap();
        server_config(&info, &common).unwrap();
    }
}
