//! `--web.config.file`: TLS and basic authentication for the HTTP endpoint, in the
//! format of the Prometheus exporter-toolkit, so tcptrace drops into the set-ups (and
//! the files) that already protect node_exporter:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # relative paths are relative to this file
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert
//!   client_ca_file: clients.crt
//!   min_version: TLS12
//! http_server_config:
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! basic_auth_users:
//!   prometheus: $2y$10$...          # bcrypt: htpasswd -nBC 10 prometheus
//! ```
//!
//! As in exporter-toolkit, an unknown key is an error: a typo must never leave the
//! endpoint open. What tcptrace cannot honour (unverified client certificates, Go's
//! cipher and curve lists) is refused by name rather than ignored.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use rustls::{
    crypto::ring::default_provider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use yaml_rust2::{Yaml, YamlLoader};

/// A file that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
#[error("--web.config.file {}: {message}", path.display())]
pub struct Error {
    pub path: PathBuf,
    pub message: String,
}

/// One read of the file: what the server applies to a connection and its requests.
pub struct WebConfig {
    /// Present when `tls_server_config` names a certificate: every connection is TLS.
    pub tls: Option<Arc<ServerConfig>>,
    /// User name to bcrypt hash; empty when no authentication is asked for.
    users: HashMap<String, String>,
    /// `http_server_config.headers`, added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Digests of credentials that verified: bcrypt is slow on purpose and Prometheus
    /// sends the same ones every scrape. Bounded; cleared when full.
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// Most verified credentials remembered.
const VERIFIED_CAP: usize = 64;

/// The response headers exporter-toolkit allows, with the values it allows (any when empty).
const ALLOWED_HEADERS: [(&str, &[&str]); 5] = [
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
    ("Content-Security-Policy", &[]),
];

impl WebConfig {
    /// No file: plain HTTP, no authentication.
    pub fn plain() -> Self {
        Self { tls: None, users: HashMap::new(), headers: Vec::new(), verified: Mutex::default() }
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        let fail = |message: String| Error { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|err| fail(format!("cannot be read: {err}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir).map_err(fail)
    }

    /// Parses the file's text; relative paths in it are taken from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Self, String> {
        let docs = YamlLoader::load_from_str(text).map_err(|err| format!("is not valid YAML: {err}"))?;
        let mut config = Self::plain();
        let Some(doc) = docs.first() else {
            return Ok(config); // An empty file, as exporter-toolkit reads it: nothing asked for.
        };
        for (key, value) in mapping(doc, "the top level")? {
            match key {
                "tls_server_config" => config.tls = tls(value, dir)?,
                "http_server_config" => config.headers = http(value)?,
                "basic_auth_users" => config.users = users(value)?,
                other => {
                    return Err(unknown(
                        other,
                        "the top level",
                        "tls_server_config, http_server_config, basic_auth_users",
                    ))
                }
            }
        }
        Ok(config)
    }

    /// Whether requests must carry credentials.
    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Credentials already verified once (no bcrypt): Prometheus's every scrape.
    pub fn known(&self, credentials: &Credentials) -> bool {
        let Some(hash) = self.users.get(&credentials.user) else {
            return false;
        };
        self.lock().contains(&credentials.digest(hash))
    }

    /// Checks credentials with bcrypt: tens of milliseconds, so call it off the async
    /// runtime. An unknown user costs the same as a wrong password.
    pub fn verify(&self, credentials: &Credentials) -> bool {
        let (hash, user_known) = match self.users.get(&credentials.user) {
            Some(hash) => (hash, true),
            None => match self.users.values().next() {
                Some(any) => (any, false),
                None => return false,
            },
        };
        let ok = bcrypt::verify(&credentials.password, hash).unwrap_or(false) && user_known;
        if ok {
            let mut verified = self.lock();
            if verified.len() >= VERIFIED_CAP {
                verified.clear();
            }
            verified.insert(credentials.digest(hash));
        }
        ok
    }

    /// What this configuration does, for the start-up log.
    pub fn describe(&self) -> String {
        let mut out = String::from(if self.tls.is_some() { "TLS" } else { "plain HTTP" });
        if self.requires_auth() {
            let _ = write!(out, ", basic authentication ({} users)", self.users.len());
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A user name and password from an `Authorization: Basic` header.
pub struct Credentials {
    user: String,
    password: String,
}

impl Credentials {
    pub fn from_header(value: Option<&HeaderValue>) -> Option<Self> {
        let encoded = value?.to_str().ok()?.strip_prefix("Basic ")?.trim();
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
        let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        Some(Self { user: user.to_owned(), password: password.to_owned() })
    }

    /// SHA-256 of user, password and hash: what the verified set remembers, so that no
    /// password is kept and a changed hash (after a reload) verifies again.
    fn digest(&self, hash: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [self.user.as_bytes(), self.password.as_bytes(), hash.as_bytes()] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// The configuration in force, replaced as a whole on reload (SIGHUP).
pub struct WebConfigFile {
    path: Option<PathBuf>,
    current: RwLock<Arc<WebConfig>>,
}

impl WebConfigFile {
    /// Reads `path` (plain HTTP without one); an unusable file is an error at start.
    pub fn open(path: Option<PathBuf>) -> Result<Self, Error> {
        let config = match &path {
            Some(path) => WebConfig::load(path)?,
            None => WebConfig::plain(),
        };
        Ok(Self { path, current: RwLock::new(Arc::new(config)) })
    }

    pub fn current(&self) -> Arc<WebConfig> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reads the file again; new connections and requests use it. On an error the
    /// configuration in force stays. `Ok(None)` when there is no file.
    pub fn reload(&self) -> Result<Option<Arc<WebConfig>>, Error> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let config = Arc::new(WebConfig::load(path)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config.clone();
        Ok(Some(config))
    }
}

fn unknown(key: &str, at: &str, known: &str) -> String {
    format!("unknown key `{key}` in {at} (known: {known})")
}

/// A YAML mapping's entries with string keys; an absent (null) section is empty.
fn mapping<'a>(value: &'a Yaml, at: &str) -> Result<Vec<(&'a str, &'a Yaml)>, String> {
    match value {
        Yaml::Null => Ok(Vec::new()),
        Yaml::Hash(map) => map
            .iter()
            .map(|(k, v)| {
                k.as_str().map(|k| (k, v)).ok_or_else(|| format!("{at} has a key that is not a string: {k:?}"))
            })
            .collect(),
        other => Err(format!("{at} must be a mapping, not {}", kind(other))),
    }
}

fn string(value: &Yaml, at: &str) -> Result<String, String> {
    match value {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Null => Ok(String::new()),
        other => Err(format!("{at} must be a string, not {}", kind(other))),
    }
}

fn kind(value: &Yaml) -> &'static str {
    match value {
        Yaml::Real(_) | Yaml::Integer(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Boolean(_) => "a boolean",
        Yaml::Array(_) => "a list",
        Yaml::Hash(_) => "a mapping",
        Yaml::Alias(_) => "an alias",
        Yaml::Null => "empty",
        Yaml::BadValue => "an invalid value",
    }
}

fn users(value: &Yaml) -> Result<HashMap<String, String>, String> {
    mapping(value, "basic_auth_users")?
        .into_iter()
        .map(|(user, hash)| {
            let at = format!("basic_auth_users.{user}");
            let hash = string(hash, &at)?;
            if user.contains(':') {
                return Err(format!("{at}: a user name cannot contain `:` (basic authentication splits on it)"));
            }
            hash.parse::<bcrypt::HashParts>()
                .map_err(|err| format!("{at} is not a bcrypt hash ({err}); make one with `htpasswd -nBC 10 {user}`"))?;
            Ok((user.to_owned(), hash))
        })
        .collect()
}

fn http(value: &Yaml) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut headers = Vec::new();
    for (key, value) in mapping(value, "http_server_config")? {
        match key {
            // tcptrace speaks HTTP/1.1 only, which is all a scrape needs.
            "http2" => {
                if !matches!(value, Yaml::Boolean(_)) {
                    return Err(format!("http_server_config.http2 must be true or false, not {}", kind(value)));
                }
            }
            "headers" => {
                for (name, v) in mapping(value, "http_server_config.headers")? {
                    let at = format!("http_server_config.headers.{name}");
                    let Some((_, allowed)) = ALLOWED_HEADERS.iter().find(|(h, _)| h.eq_ignore_ascii_case(name)) else {
                        let names: Vec<_> = ALLOWED_HEADERS.iter().map(|(h, _)| *h).collect();
                        return Err(format!("{at}: not a header that may be set (allowed: {})", names.join(", ")));
                    };
                    let v = string(v, &at)?;
                    if !allowed.is_empty() && !allowed.iter().any(|a| a.eq_ignore_ascii_case(&v)) {
                        return Err(format!("{at}: `{v}` is not allowed (allowed: {})", allowed.join(", ")));
                    }
                    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|err| format!("{at}: {err}"))?;
                    let v = HeaderValue::from_str(&v).map_err(|err| format!("{at}: {err}"))?;
                    headers.push((name, v));
                }
            }
            other => return Err(unknown(other, "http_server_config", "http2, headers")),
        }
    }
    Ok(headers)
}

const CLIENT_AUTH_TYPES: &str = "NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert";

/// Which client certificates a TLS server asks for (exporter-toolkit's names).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    None,
    VerifyIfGiven,
    RequireAndVerify,
}

fn tls(value: &Yaml, dir: &Path) -> Result<Option<Arc<ServerConfig>>, String> {
    let (mut cert, mut key, mut client_ca) = (String::new(), String::new(), String::new());
    let mut auth = ClientAuth::None;
    let (mut min, mut max) = (TlsVersion::Tls12, TlsVersion::Tls13);
    for (k, v) in mapping(value, "tls_server_config")? {
        let at = format!("tls_server_config.{k}");
        match k {
            "cert_file" => cert = string(v, &at)?,
            "key_file" => key = string(v, &at)?,
            "client_ca_file" => client_ca = string(v, &at)?,
            "client_auth_type" => {
                auth = match string(v, &at)?.as_str() {
                    "" | "NoClientCert" => ClientAuth::None,
                    "VerifyClientCertIfGiven" => ClientAuth::VerifyIfGiven,
                    "RequireAndVerifyClientCert" => ClientAuth::RequireAndVerify,
                    unverified @ ("RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert") => {
                        return Err(format!(
                            "{at}: {unverified} accepts client certificates nobody verified, which tcptrace does \
                             not do; use RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
                        ))
                    }
                    other => return Err(format!("{at}: unknown `{other}` ({CLIENT_AUTH_TYPES})")),
                }
            }
            "min_version" => min = TlsVersion::parse(&string(v, &at)?, &at)?,
            "max_version" => match string(v, &at)?.as_str() {
                old @ ("TLS10" | "TLS11") => {
                    return Err(format!(
                        "{at}: {old} as the newest version leaves nothing: rustls speaks TLS 1.2 and 1.3"
                    ))
                }
                newest => max = TlsVersion::parse(newest, &at)?,
            },
            // Go ignores it since 1.18; accepted so that existing files load.
            "prefer_server_cipher_suites" => {}
            "cipher_suites" | "curve_preferences" | "client_allowed_sans" | "cert" | "key" | "client_ca" => {
                return Err(format!(
                    "{at} is not supported by tcptrace (its TLS library, rustls, offers only modern suites and \
                     curves; certificates come from cert_file, key_file and client_ca_file): remove it"
                ))
            }
            other => {
                return Err(unknown(
                    other,
                    "tls_server_config",
                    "cert_file, key_file, client_auth_type, client_ca_file, min_version, max_version",
                ))
            }
        }
    }
    if cert.is_empty() && key.is_empty() && client_ca.is_empty() && auth == ClientAuth::None {
        return Ok(None); // An empty section: plain HTTP, as exporter-toolkit does.
    }
    if cert.is_empty() || key.is_empty() {
        return Err("tls_server_config needs both cert_file and key_file".into());
    }
    if min > max {
        return Err("tls_server_config: min_version is above max_version".into());
    }
    let provider = Arc::new(default_provider());
    let versions: Vec<_> = [(TlsVersion::Tls12, &rustls::version::TLS12), (TlsVersion::Tls13, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(v, _)| (min..=max).contains(v))
        .map(|(_, v)| v)
        .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|err| format!("tls_server_config: {err}"))?;
    let builder = match (auth, client_ca.is_empty()) {
        (ClientAuth::None, true) => builder.with_no_client_auth(),
        (ClientAuth::None, false) => {
            return Err("tls_server_config: client_ca_file is set but client_auth_type is not: set it to \
                        RequireAndVerifyClientCert (or VerifyClientCertIfGiven)"
                .into())
        }
        (_, true) => return Err("tls_server_config: client_auth_type verifies certificates: set client_ca_file".into()),
        (auth, false) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(&dir.join(&client_ca), "client_ca_file")? {
                roots.add(ca).map_err(|err| format!("tls_server_config.client_ca_file: {err}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if auth == ClientAuth::VerifyIfGiven { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(
                verifier.build().map_err(|err| format!("tls_server_config.client_ca_file: {err}"))?,
            )
        }
    };
    let key_path = dir.join(&key);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|err| format!("tls_server_config.key_file {}: no private key read ({err})", key_path.display()))?;
    let mut config = builder
        .with_single_cert(certificates(&dir.join(&cert), "cert_file")?, key)
        .map_err(|err| format!("tls_server_config: the certificate and key cannot be used together: {err}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let at = |err: String| format!("tls_server_config.{key} {}: {err}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| at(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| at(err.to_string()))?;
    if certs.is_empty() {
        return Err(at("no PEM certificate in it".into()));
    }
    Ok(certs)
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    /// TLS 1.0 and 1.1 are accepted as a minimum and mean 1.2: rustls never speaks them.
    fn parse(s: &str, at: &str) -> Result<Self, String> {
        match s {
            "TLS10" | "TLS11" | "TLS12" => Ok(Self::Tls12),
            "TLS13" => Ok(Self::Tls13),
            other => Err(format!("{at}: unknown `{other}` (TLS10, TLS11, TLS12, TLS13)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig, String> {
        WebConfig::parse(text, Path::new("/nonexistent"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        }
    }

    fn basic(user: &str, password: &str) -> HeaderValue {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[test]
    fn an_empty_file_or_section_asks_for_nothing() {
        for text in ["", "tls_server_config:\n", "tls_server_config: {}\nbasic_auth_users:\n"] {
            let c = parse(text).unwrap();
            assert!(c.tls.is_none() && !c.requires_auth(), "{text:?}");
        }
    }

    #[test]
    fn mistakes_are_refused_by_name() {
        for (text, says) in [
            ("tls_server_config:\n  cert_fil: a\n", "unknown key `cert_fil` in tls_server_config"),
            ("basic_auth_user:\n  a: b\n", "unknown key `basic_auth_user` in the top level"),
            ("tls_server_config:\n  cert_file: a.crt\n", "needs both cert_file and key_file"),
            (
                "tls_server_config:\n  client_ca_file: ca.crt\n  cert_file: a\n  key_file: b\n",
                "client_auth_type is not",
            ),
            ("tls_server_config:\n  client_auth_type: RequireAnyClientCert\n", "nobody verified"),
            (
                "tls_server_config:\n  client_auth_type: RequireAndVerifyClientCert\n  cert_file: a\n  key_file: b\n",
                "set client_ca_file",
            ),
            ("tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "not supported by tcptrace"),
            ("tls_server_config:\n  min_version: TLS14\n", "unknown `TLS14`"),
            ("tls_server_config:\n  max_version: TLS11\n", "leaves nothing"),
            (
                "tls_server_config:\n  min_version: TLS13\n  max_version: TLS12\n  cert_file: a\n  key_file: b\n",
                "above max_version",
            ),
            ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n", "/nonexistent/a.key"),
            ("basic_auth_users:\n  alice: secret\n", "not a bcrypt hash"),
            ("basic_auth_users:\n  alice: [1]\n", "must be a string"),
            ("basic_auth_users: [alice]\n", "must be a mapping"),
            ("http_server_config:\n  headers:\n    Server: x\n", "not a header that may be set"),
            ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "`allow` is not allowed"),
            ("http_server_config:\n  http2: maybe\n", "true or false"),
            ("tls_server_config: [\n", "not valid YAML"),
        ] {
            let e = err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn users_and_headers_are_read() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let c = parse(&format!(
            "basic_auth_users:\n  alice: '{hash}'\nhttp_server_config:\n  http2: false\n  headers:\n    \
             X-Frame-Options: deny\n    Strict-Transport-Security: max-age=60\n"
        ))
        .unwrap();
        assert!(c.requires_auth());
        assert_eq!(c.headers.len(), 2);
        assert_eq!(c.headers[0].0, "x-frame-options");
        assert_eq!(c.describe(), "plain HTTP, basic authentication (1 users)");
    }

    #[test]
    fn credentials_verify_once_then_come_from_the_verified_set() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let c = parse(&format!("basic_auth_users:\n  alice: '{hash}'\n  bob: '{hash}'\n")).unwrap();
        let right = Credentials::from_header(Some(&basic("alice", "secret"))).unwrap();
        assert!(!c.known(&right));
        assert!(c.verify(&right));
        assert!(c.known(&right));
        for (user, password) in [("alice", "wrong"), ("mallory", "secret"), ("alice", "")] {
            let creds = Credentials::from_header(Some(&basic(user, password))).unwrap();
            assert!(!c.verify(&creds) && !c.known(&creds), "{user}:{password}");
        }
        // A password with a colon keeps it; malformed headers give no credentials.
        assert_eq!(Credentials::from_header(Some(&basic("a", "b:c"))).unwrap().password, "b:c");
        for bad in ["Bearer x", "Basic !!!", "Basic Zm9v"] {
            assert!(Credentials::from_header(Some(&HeaderValue::from_static(bad))).is_none(), "{bad}");
        }
        assert!(Credentials::from_header(None).is_none());
    }

    #[test]
    fn the_verified_set_stays_bounded() {
        let hash = bcrypt::hash("p", 4).unwrap();
        let c = parse(&format!("basic_auth_users:\n  u: '{hash}'\n")).unwrap();
        for i in 0..(VERIFIED_CAP * 2) {
            c.lock().insert([i as u8; 32]);
            assert!(c.lock().len() <= VERIFIED_CAP * 2);
        }
        assert!(c.verify(&Credentials::from_header(Some(&basic("u", "p"))).unwrap()));
        assert!(c.lock().len() <= VERIFIED_CAP);
    }

    #[test]
    fn a_failed_reload_keeps_the_configuration_in_force() {
        let dir = std::env::temp_dir().join(format!("tcptrace-webconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.yml");
        let hash = bcrypt::hash("p", 4).unwrap();
        std::fs::write(&path, format!("basic_auth_users:\n  u: '{hash}'\n")).unwrap();
        let file = WebConfigFile::open(Some(path.clone())).unwrap();
        assert!(file.current().requires_auth());
        std::fs::write(&path, "basic_auth_users:\n  u: not-a-hash\n").unwrap();
        let e = file.reload().err().unwrap().to_string();
        assert!(e.contains("web.yml") && e.contains("not a bcrypt hash"), "{e}");
        assert!(file.current().requires_auth());
        std::fs::write(&path, "").unwrap();
        assert!(!file.reload().unwrap().unwrap().requires_auth());
        assert!(!file.current().requires_auth());
        assert!(WebConfigFile::open(None).unwrap().reload().unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
