//! A small HTTP client for the API, used by the CLI commands (`peersync put|get|...`).

use std::time::Duration;

use reqwest::{Method, StatusCode};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid --api URL {0:?}: expected http://HOST:PORT")]
    BadUrl(String),
    #[error("cannot reach the node at {url}: {source}; is `peersync node` running there?")]
    Unreachable { url: String, source: reqwest::Error },
    /// The node answered with an error status; `code` and `message` come from its JSON body.
    #[error("{code}: {message}")]
    Api { status: StatusCode, code: String, message: String },
}

/// Talks to one node's HTTP API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// For streamed answers: a deadline on connecting only, not on the whole answer.
    streaming: reqwest::Client,
    /// Sent as `Authorization: Bearer TOKEN` when set.
    token: Option<String>,
}

impl Client {
    /// `api` is `http://HOST:PORT` (a bare `HOST:PORT` is accepted too).
    pub fn new(api: &str) -> Result<Client, ClientError> {
        let base = if api.contains("://") { api.to_owned() } else { format!("http://{api}") };
        let base = base.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base).map_err(|_| ClientError::BadUrl(api.to_owned()))?;
        if parsed.scheme() != "http" || parsed.host().is_none() {
            return Err(ClientError::BadUrl(api.to_owned()));
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("http client builds");
        let streaming =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build().expect("http client builds");
        Ok(Client { base, http, streaming, token: None })
    }

    /// Sends `token` as a bearer token with every request (for a node run with `--api-token-file`).
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Sends a request to `path` (already percent-encoded) and returns the body of a 2xx answer.
    pub async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>, ClientError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = self.send(req).await?;
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })
    }

    /// Opens `GET path`, a streamed answer (such as `/v1/progress`), and returns it once its 2xx
    /// head has come: read it with [`reqwest::Response::chunk`] for as long as it lasts.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        self.send(self.streaming.get(format!("{}{path}", self.base))).await
    }

    /// Sends `req` with the token; a non-2xx answer becomes [`ClientError::Api`].
    async fn send(&self, mut req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name)).and_then(|v| v.as_str()).map(str::to_owned);
        Err(ClientError::Api {
            status,
            code: field("error").unwrap_or_else(|| status.as_u16().to_string()),
            message: field("message").unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
        })
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
