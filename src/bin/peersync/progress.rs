//! `peersync progress`: follows the node's `GET /v1/progress` stream on the terminal.

use std::io::Write;

use peersync::api::client::{segment, Client};

/// `peersync progress`: copies the node's progress lines to stdout as they come, and ends at the
/// line that reaches `until` (an error if the node ends the stream first).
pub async fn run(client: &Client, api: &str, origin: Option<&str>, until: Option<u64>) -> anyhow::Result<()> {
    let path = match origin {
        Some(o) => format!("/v1/progress?origin={}", segment(o)),
        None => "/v1/progress".to_owned(),
    };
    let mut stream = client.stream(&path).await?;
    let mut pending = Vec::new();
    while let Some(chunk) =
        stream.chunk().await.map_err(|e| anyhow::anyhow!("the progress stream from {api} broke: {e}"))?
    {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let mut out = std::io::stdout().lock();
            out.write_all(&line)?;
            out.flush()?;
            if let Some(until) = until {
                let seq = serde_json::from_slice::<serde_json::Value>(&line)
                    .map_err(|e| anyhow::anyhow!("the node sent a progress line that is not JSON: {e}"))?["seq"]
                    .as_u64();
                if seq.is_some_and(|s| s >= until) {
                    return Ok(());
                }
            }
        }
    }
    anyhow::bail!("the node at {api} ended the progress stream (it is shutting down)")
}
