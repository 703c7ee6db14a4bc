//! The sync protocol's codec: one CBOR message per stream, read to the end of the stream, as
//! libp2p's `request_response::cbor` codec frames it (the bytes on the wire are the same).
//!
//! It reads differently. libp2p's codec reads with `read_to_end` into a new `Vec`, which doubles
//! from 32 bytes to the message's size and zero-fills every new half before reading into it; a
//! replay answer of a few MiB then costs twice its size in fresh pages, zeroed and copied. In a
//! `perf` profile of a W1 replica, reading and decoding responses took 13.2 % of the runtime
//! thread's samples that way and 8.9 % this way (`memset` 7.7 % against 2.3 %). Here a message is
//! read into a buffer kept from earlier messages (two are pooled), zero-filled only when it first
//! grows, and a message over the limit is refused as such rather than as a truncated message.

use std::io;
use std::sync::Mutex;

use futures::prelude::*;
use libp2p::request_response;
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::{SyncRequest, SyncResponse};

/// Buffers kept for the next messages, at most. With [`MAX_POOLED_BYTES`] this bounds what the pool
/// holds after a transfer to 32 MiB; a node that only ever reads small messages holds 32 KiB.
const POOLED: usize = 2;
/// A new buffer's size; it grows (and stays grown) as larger messages come.
const FIRST_BYTES: usize = 16 * 1024;
/// Buffers that grew beyond this are not kept.
const MAX_POOLED_BYTES: usize = 16 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[derive(Debug, Clone)]
pub struct SyncCodec {
    request_bytes: usize,
    response_bytes: usize,
}

impl SyncCodec {
    /// A codec refusing requests over `request_bytes` and responses over `response_bytes`.
    pub fn new(request_bytes: usize, response_bytes: usize) -> Self {
        SyncCodec { request_bytes, response_bytes }
    }
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.request_bytes, "request").await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.response_bytes, "response").await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, request: SyncRequest) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &request).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, response: SyncResponse) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &response).await
    }
}

async fn write_message<T, M>(io: &mut T, message: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: Serialize,
{
    let bytes = cbor4ii::serde::to_vec(Vec::new(), message).map_err(io::Error::other)?;
    io.write_all(&bytes).await
}

/// Reads the stream to its end, at most `limit` bytes, and decodes one message from it.
async fn read_message<T, M>(io: &mut T, limit: usize, what: &str) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: DeserializeOwned,
{
    let mut buf = Buffer::take();
    let len = buf.read_to_end(io, limit, what).await?;
    cbor4ii::serde::from_slice(&buf.0[..len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("undecodable {what}: {e}")))
}

/// A buffer from the pool, given back when dropped. Reads go into its length, all of which is
/// initialised, so a buffer is zeroed only where it grows.
struct Buffer(Vec<u8>);

impl Buffer {
    fn take() -> Buffer {
        let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Buffer(pooled.unwrap_or_else(|| vec![0; FIRST_BYTES]))
    }

    /// Reads `io` to its end into the buffer and returns how many bytes it held. More than `limit`
    /// bytes is an error naming the limit.
    async fn read_to_end<T>(&mut self, io: &mut T, limit: usize, what: &str) -> io::Result<usize>
    where
        T: AsyncRead + Unpin + Send,
    {
        // Reading one byte past the limit tells an oversized message from one of exactly `limit`.
        let cap = limit.saturating_add(1);
        let mut len = 0;
        loop {
            if len > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{what} larger than the limit of {limit} bytes"),
                ));
            }
            if len == self.0.len() {
                let grown = len.saturating_mul(2).clamp(FIRST_BYTES, cap);
                self.0.resize(grown, 0);
            }
            let end = self.0.len().min(cap);
            match io.read(&mut self.0[len..end]).await {
                Ok(0) => return Ok(len),
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.len() > MAX_POOLED_BYTES {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOLED {
            pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Seq;
    use request_response::Codec as _;

    fn encoded<M: Serialize>(m: &M) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), m).unwrap()
    }

    /// A reader that hands out at most `step` bytes per read, as a stream does.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = self.data.len().min(self.step).min(out.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(n))
        }
    }

    fn big_response(bytes: usize) -> SyncResponse {
        SyncResponse::Chunk(vec![7u8; bytes])
    }

    #[tokio::test]
    async fn reads_what_libp2ps_cbor_codec_writes_and_writes_the_same_bytes() {
        let request =
            SyncRequest::GetOps { origin: libp2p::PeerId::random(), after: Seq(5), max_ops: 9, max_bytes: 99 };
        let mut codec = SyncCodec::new(1 << 20, 1 << 20);
        let mut wrote = Vec::new();
        codec.write_request(&crate::net::SYNC_PROTOCOL, &mut wrote, request.clone()).await.unwrap();
        assert_eq!(wrote, encoded(&request));
        let mut libp2p = request_response::cbor::codec::Codec::<SyncRequest, SyncResponse>::default();
        let mut theirs = Vec::new();
        libp2p.write_request(&crate::net::SYNC_PROTOCOL, &mut theirs, request.clone()).await.unwrap();
        assert_eq!(wrote, theirs);
        let read =
            codec.read_request(&crate::net::SYNC_PROTOCOL, &mut Trickle { data: &theirs, step: 3 }).await.unwrap();
        assert_eq!(read, request);
    }

    #[tokio::test]
    async fn a_large_message_read_in_pieces_with_buffers_reused() {
        let mut codec = SyncCodec::new(1 << 10, 4 << 20);
        for size in [3 << 20, 100, 2 << 20, 0] {
            let response = big_response(size);
            let bytes = encoded(&response);
            let read = codec
                .read_response(&crate::net::SYNC_PROTOCOL, &mut Trickle { data: &bytes, step: 70_000 })
                .await
                .unwrap();
            assert_eq!(read, response, "{size}");
        }
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_naming_it_and_one_at_the_limit_is_read() {
        let response = big_response(5000);
        let bytes = encoded(&response);
        let mut exact = SyncCodec::new(16, bytes.len());
        let read = exact.read_response(&crate::net::SYNC_PROTOCOL, &mut Trickle { data: &bytes, step: 999 }).await;
        assert_eq!(read.unwrap(), response);
        let mut short = SyncCodec::new(16, bytes.len() - 1);
        let err = short
            .read_response(&crate::net::SYNC_PROTOCOL, &mut Trickle { data: &bytes, step: 999 })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&format!("limit of {} bytes", bytes.len() - 1)), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_a_truncated_message_are_errors_not_panics() {
        let mut codec = SyncCodec::new(1 << 20, 1 << 20);
        let garbage = [0xffu8, 0x00, 0x13, 0x37];
        assert!(codec
            .read_request(&crate::net::SYNC_PROTOCOL, &mut Trickle { data: &garbage, step: 1 })
            .await
            .is_err());
        let bytes = encoded(&big_response(300));
        let cut = &bytes[..bytes.len() - 10];
        assert!(codec.read_response(&crate::net::SYNC_PROTOCOL, &mut Trickle { data: cut, step: 64 }).await.is_err());
        assert!(codec.read_response(&crate::net::SYNC_PROTOCOL, &mut Trickle { data: &[], step: 64 }).await.is_err());
    }
}
