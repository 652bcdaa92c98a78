//! The process's TLS crypto provider.

/// Installs rustls's process-wide crypto provider: ring, the only one
/// compiled in. tonic would pick it itself, but the registry client's
/// reqwest (built without a provider of its own) only reads the process
/// default and panics in `oci_client::Client::new` if none is installed.
/// The registry client and the CLI call it; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
