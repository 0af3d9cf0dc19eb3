//! A Kubernetes fixture server: the kubelet's `/pods` and the API server's TokenReview,
//! Pod and Node endpoints, answered from the recorded API shapes under
//! `specs/vectors/k8s/`, over HTTPS with a test CA (rcgen) and a bearer-token check (401
//! without the right token). No cluster runs here; see `specs/vectors/k8s/README.md`.
//!
//! Knobs: a delay before every answer (a slow kubelet), a huge or malformed `/pods`
//! answer, and a pod hidden from `/pods` until some time after a moment (a container the
//! kubelet does not list yet). TokenReview authenticates only tokens minted by
//! [`K8sFixture::mint_psat`] (a token of another fixture is "signed by another cluster"),
//! refuses expired ones and ones without the asked audience, and otherwise answers the
//! recorded authenticated review with the token's user, pod and node.
#![expect(
    clippy::indexing_slicing,
    reason = "a test fixture: JSON paths into recorded answers, byte ranges checked by the loop"
)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The recorded answers, as served.
pub fn vector(name: &str) -> String {
    let path = crate::env::workspace_root()
        .join("specs/vectors/k8s")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The container of the `checkout` pod in `kubelet_pods.json`.
pub const CHECKOUT_CONTAINER_ID: &str =
    "9d5f2a4e0c1b3a7d8e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";
/// The UID of the `checkout` pod.
pub const CHECKOUT_POD_UID: &str = "5a1c7e9e-3b2f-4c8d-9a6e-1f2b3c4d5e6f";
/// The agent's pod in `pod_writ_writ-agent-4kq8z.json`.
pub const AGENT_POD: (&str, &str, &str) = (
    "writ",
    "writ-agent-4kq8z",
    "c2a7f1d3-8e4b-4f6a-b1c9-2d3e4f5a6b7c",
);
/// The node in `node_node-1.json`: name and UID.
pub const NODE: (&str, &str) = ("node-1", "b3f1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d");

/// What `/pods` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodsAnswer {
    /// The recorded list.
    Recorded,
    /// A body of this many bytes, sent without a length (close-delimited).
    Huge(usize),
    /// A truncated, invalid JSON body.
    Malformed,
}

#[derive(Debug)]
struct Knobs {
    delay: Duration,
    pods: PodsAnswer,
    hidden: Option<(String, Instant)>,
    tokens: HashSet<String>,
    pods_requests: u64,
}

/// A running fixture server. Stops when dropped.
#[derive(Debug)]
pub struct K8sFixture {
    /// Its address (127.0.0.1, a free port).
    pub addr: SocketAddr,
    /// The test CA that signed its certificate (PEM).
    pub ca_pem: String,
    /// The bearer token it requires.
    pub bearer: String,
    knobs: Arc<Mutex<Knobs>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for K8sFixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tls_config() -> (Arc<rustls::ServerConfig>, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "writ k8s fixture CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        NODE.0.to_owned(),
    ])
    .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (Arc::new(config), ca.pem())
}

impl K8sFixture {
    /// Starts a fixture on 127.0.0.1 with a fresh CA and bearer token.
    pub async fn start() -> Self {
        let (tls, ca_pem) = tls_config();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bearer = format!("fixture-{}", rand_hex());
        let knobs = Arc::new(Mutex::new(Knobs {
            delay: Duration::ZERO,
            pods: PodsAnswer::Recorded,
            hidden: None,
            tokens: HashSet::new(),
            pods_requests: 0,
        }));
        let state = (knobs.clone(), bearer.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let (knobs, bearer) = state.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve(tls, &knobs, &bearer).await;
                    }
                });
            }
        });
        Self {
            addr,
            ca_pem,
            bearer,
            knobs,
            task,
        }
    }

    /// Waits this long before every answer.
    pub fn set_delay(&self, delay: Duration) {
        self.knobs.lock().unwrap().delay = delay;
    }

    /// What `/pods` answers.
    pub fn set_pods_answer(&self, answer: PodsAnswer) {
        self.knobs.lock().unwrap().pods = answer;
    }

    /// Leaves the pod `uid` out of `/pods` for `after` from now.
    pub fn hide_pod_for(&self, uid: &str, after: Duration) {
        self.knobs.lock().unwrap().hidden = Some((uid.to_owned(), Instant::now() + after));
    }

    /// How many `/pods` requests were answered (authenticated or not).
    pub fn pods_requests(&self) -> u64 {
        self.knobs.lock().unwrap().pods_requests
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Writes the CA (`ca.crt`), the bearer token (`token`) and a kubeconfig
    /// (`kubeconfig`) for this fixture into `dir`; returns their paths.
    pub fn write_files(&self, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let ca = dir.join("ca.crt");
        let token = dir.join("token");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&ca, &self.ca_pem).unwrap();
        std::fs::write(&token, &self.bearer).unwrap();
        let ca_data = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: {}\n    certificate-authority-data: {ca_data}\nusers:\n- name: writ-server\n  user:\n    token: {}\ncontexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: writ-server\ncurrent-context: fixture\n",
                self.url(),
                self.bearer
            ),
        )
        .unwrap();
        (ca, token, kubeconfig)
    }

    /// A projected service-account token this fixture's TokenReview authenticates: a
    /// JWT with the claims Kubernetes puts in one (not signed: the fixture knows it).
    pub fn mint_psat(&self, psat: &Psat) -> String {
        let token = psat.jwt();
        self.knobs.lock().unwrap().tokens.insert(token.clone());
        token
    }
}

/// The claims of a projected service-account token.
#[derive(Debug, Clone)]
pub struct Psat {
    /// `aud`.
    pub audience: Vec<String>,
    /// `exp` (Unix seconds).
    pub exp: i64,
    /// Service account namespace and name.
    pub service_account: (String, String),
    /// Pod name and UID.
    pub pod: (String, String),
    /// Node name and UID.
    pub node: (String, String),
}

impl Default for Psat {
    /// The agent pod's token for `writ-server`, valid for an hour.
    fn default() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        Self {
            audience: vec!["writ-server".to_owned()],
            exp: i64::try_from(now).unwrap() + 3600,
            service_account: ("writ".into(), "writ-agent".into()),
            pod: (AGENT_POD.1.into(), AGENT_POD.2.into()),
            node: (NODE.0.into(), NODE.1.into()),
        }
    }
}

impl Psat {
    fn claims(&self) -> Value {
        json!({
            "aud": self.audience,
            "exp": self.exp,
            "iat": self.exp - 3600,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "jti": rand_hex(),
            "kubernetes.io": {
                "namespace": self.service_account.0,
                "node": { "name": self.node.0, "uid": self.node.1 },
                "pod": { "name": self.pod.0, "uid": self.pod.1 },
                "serviceaccount": { "name": self.service_account.1, "uid": "e4d3c2b1-a0f9-4e8d-9c7b-6a5f4e3d2c1b" }
            },
            "nbf": self.exp - 3600,
            "sub": format!("system:serviceaccount:{}:{}", self.service_account.0, self.service_account.1),
        })
    }

    fn jwt(&self) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"writ-fixture"}"#),
            b64(self.claims().to_string().as_bytes()),
            b64(rand_hex().as_bytes())
        )
    }
}

fn rand_hex() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let mut authorization = None;
    let mut length = 0usize;
    for line in lines {
        let (k, v) = line.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "authorization" => authorization = Some(v.trim().to_owned()),
            "content-length" => length = v.trim().parse().ok()?,
            _ => {}
        }
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        authorization,
        body,
    })
}

async fn respond<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 | 201 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    s.shutdown().await
}

fn status_json(code: u16, reason: &str, message: &str) -> Vec<u8> {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code
    })
    .to_string()
    .into_bytes()
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    knobs: &Mutex<Knobs>,
    bearer: &str,
) -> std::io::Result<()> {
    let Some(req) = read_request(&mut s).await else {
        return Ok(());
    };
    let delay = knobs.lock().unwrap().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.path.split('?').next().unwrap_or("").to_owned();
    if path == "/pods" {
        knobs.lock().unwrap().pods_requests += 1;
    }
    if req.authorization.as_deref() != Some(&format!("Bearer {bearer}")) {
        let body = status_json(401, "Unauthorized", "Unauthorized");
        return respond(&mut s, 401, &body).await;
    }
    match (req.method.as_str(), path.as_str()) {
        ("GET", "/pods") => {
            let (answer, hidden) = {
                let k = knobs.lock().unwrap();
                (k.pods, k.hidden.clone())
            };
            match answer {
                PodsAnswer::Recorded => {
                    let mut list: Value =
                        serde_json::from_str(&vector("kubelet_pods.json")).unwrap();
                    if let Some((uid, until)) = hidden
                        && Instant::now() < until
                    {
                        list["items"]
                            .as_array_mut()
                            .unwrap()
                            .retain(|p| p["metadata"]["uid"] != uid.as_str());
                    }
                    respond(&mut s, 200, list.to_string().as_bytes()).await
                }
                PodsAnswer::Malformed => {
                    let text = vector("kubelet_pods.json");
                    respond(&mut s, 200, &text.as_bytes()[..text.len() / 2]).await
                }
                PodsAnswer::Huge(n) => {
                    s.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"items\":[",
                    )
                    .await?;
                    let chunk = vec![b' '; 64 * 1024];
                    let mut sent = 0;
                    while sent < n {
                        s.write_all(&chunk).await?;
                        sent += chunk.len();
                    }
                    s.write_all(b"]}").await?;
                    s.shutdown().await
                }
            }
        }
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let body = token_review(knobs, &req.body);
            respond(&mut s, 201, body.to_string().as_bytes()).await
        }
        ("GET", p) if p.starts_with("/api/v1/namespaces/") => {
            let rest = &p["/api/v1/namespaces/".len()..];
            match rest.split('/').collect::<Vec<_>>().as_slice() {
                [ns, "pods", name] if (*ns, *name) == (AGENT_POD.0, AGENT_POD.1) => {
                    respond(
                        &mut s,
                        200,
                        vector("pod_writ_writ-agent-4kq8z.json").as_bytes(),
                    )
                    .await
                }
                [_, "pods", name] => {
                    let msg = format!("pods \"{name}\" not found");
                    respond(&mut s, 404, &status_json(404, "NotFound", &msg)).await
                }
                _ => respond(&mut s, 404, &status_json(404, "NotFound", "not found")).await,
            }
        }
        ("GET", p) if p.starts_with("/api/v1/nodes/") => {
            let name = &p["/api/v1/nodes/".len()..];
            if name == NODE.0 {
                respond(&mut s, 200, vector("node_node-1.json").as_bytes()).await
            } else {
                let msg = format!("nodes \"{name}\" not found");
                respond(&mut s, 404, &status_json(404, "NotFound", &msg)).await
            }
        }
        _ => respond(&mut s, 404, &status_json(404, "NotFound", "not found")).await,
    }
}

/// The API server's answer to a TokenReview, from the recorded shapes.
fn token_review(knobs: &Mutex<Knobs>, body: &[u8]) -> Value {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let token = request["spec"]["token"].as_str().unwrap_or("").to_owned();
    let asked: Vec<String> = request["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut refused: Value =
        serde_json::from_str(&vector("tokenreview_unauthenticated.json")).unwrap();
    refused["spec"]["audiences"] = json!(asked);
    let refuse = |mut r: Value, error: String| {
        r["status"]["error"] = json!(error);
        r
    };
    if !knobs.lock().unwrap().tokens.contains(&token) {
        return refuse(
            refused,
            "[invalid bearer token, square/go-jose: error in cryptographic primitive]".into(),
        );
    }
    let claims: Value = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    if claims["exp"].as_i64().unwrap_or(0) <= now {
        return refuse(
            refused,
            "[invalid bearer token, service account token has expired]".into(),
        );
    }
    let aud: Vec<String> = claims["aud"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let granted: Vec<String> = asked.iter().filter(|a| aud.contains(a)).cloned().collect();
    if !asked.is_empty() && granted.is_empty() {
        return refuse(
            refused,
            format!(
                "[invalid bearer token, token audiences {aud:?} is invalid for the target audiences {asked:?}]"
            ),
        );
    }
    let k = &claims["kubernetes.io"];
    let (ns, sa) = (
        k["namespace"].as_str().unwrap_or(""),
        k["serviceaccount"]["name"].as_str().unwrap_or(""),
    );
    let mut review: Value =
        serde_json::from_str(&vector("tokenreview_authenticated.json")).unwrap();
    review["spec"]["audiences"] = json!(asked);
    review["status"]["audiences"] = json!(granted);
    let user = &mut review["status"]["user"];
    user["username"] = json!(format!("system:serviceaccount:{ns}:{sa}"));
    user["groups"] = json!([
        "system:serviceaccounts",
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated"
    ]);
    let extra = &mut user["extra"];
    extra["authentication.kubernetes.io/pod-name"] = json!([k["pod"]["name"]]);
    extra["authentication.kubernetes.io/pod-uid"] = json!([k["pod"]["uid"]]);
    extra["authentication.kubernetes.io/node-name"] = json!([k["node"]["name"]]);
    extra["authentication.kubernetes.io/node-uid"] = json!([k["node"]["uid"]]);
    review
}
