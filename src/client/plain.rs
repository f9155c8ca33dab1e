//! A minimal HTTP/1.1 GET for long-lived listen streams over plain TCP.
//!
//! Why not reqwest here: a worker holds one stream per thing, and hyper keeps an 8 KiB write
//! buffer and an 8 KiB read buffer per connection for its whole life, about 23 KiB per idle
//! stream in all (230 MiB for 10,000 things, measured with `cargo bench --bench harness -- fanin`). This
//! transport waits for readability without holding a buffer and allocates only while bytes are
//! arriving. It is used only for `http://` servers with no proxy configured (boards and the
//! sandbox speak plain HTTP); TLS and proxies stay with reqwest.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::error::Error;

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Bytes read per wake-up while data flows.
const READ_CHUNK: usize = 4096;

/// Whether plain TCP may carry streams to `url`: `http://`, and no proxy asked for in the
/// environment (reqwest honours those variables; so must we, by deferring to it).
pub fn usable_for(url: &reqwest::Url) -> bool {
    url.scheme() == "http"
        && ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .all(|name| std::env::var_os(name).is_none_or(|v| v.is_empty()))
}

pub struct Response {
    pub status: u16,
    /// `Some` for a finished answer (a failure envelope, normally); `None` for a stream.
    pub content_length: Option<usize>,
    pub body: BoxStream<'static, Result<Bytes, Error>>,
}

fn io_error(error: io::Error) -> Error {
    Error::Connection(error)
}

/// Connects, sends the GET, reads the head, and returns the body as a stream of de-chunked
/// bytes.
pub async fn get(
    url: &reqwest::Url,
    user_agent: &str,
    connect_timeout: Duration,
) -> Result<Response, Error> {
    let host = url
        .host_str()
        .ok_or_else(|| Error::Config("the URL has no host".to_owned()))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let connect = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port));
    let mut stream = tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| io_error(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))?
        .map_err(io_error)?;
    let _ = stream.set_nodelay(true);
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let host_header = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: {user_agent}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_error)?;

    let mut head = BytesMut::with_capacity(1024);
    let (status, framing, head_len) = loop {
        stream.readable().await.map_err(io_error)?;
        match stream.try_read_buf(&mut head) {
            Ok(0) => {
                return Err(io_error(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed before answering",
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(io_error(e)),
        }
        if let Some(parsed) = parse_head(&head)? {
            break parsed;
        }
        if head.len() > MAX_HEAD {
            return Err(io_error(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head too large",
            )));
        }
    };
    let rest = head.split_off(head_len).freeze();
    drop(head);
    let content_length = match framing {
        Framing::Length(length) => Some(length),
        _ => None,
    };
    let body = body_stream(stream, framing, rest);
    Ok(Response {
        status,
        content_length,
        body,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
}

/// (status, framing, head length) once the whole head is in `bytes`.
fn parse_head(bytes: &[u8]) -> Result<Option<(u16, Framing, usize)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => {
            return Err(io_error(io::Error::new(
                io::ErrorKind::InvalidData,
                error.to_string(),
            )));
        }
    };
    let status = response.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        } else if header.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked
        {
            let length = value.trim().parse().map_err(|_| {
                io_error(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad Content-Length",
                ))
            })?;
            framing = Framing::Length(length);
        }
    }
    Ok(Some((status, framing, head_len)))
}

struct BodyState {
    stream: TcpStream,
    framing: Framing,
    chunks: ChunkedDecoder,
    /// Bytes of a Content-Length body still to come.
    remaining: usize,
    pending: Option<Bytes>,
    done: bool,
}

fn body_stream(
    stream: TcpStream,
    framing: Framing,
    first: Bytes,
) -> BoxStream<'static, Result<Bytes, Error>> {
    let remaining = match framing {
        Framing::Length(length) => length,
        _ => usize::MAX,
    };
    let state = BodyState {
        stream,
        framing,
        chunks: ChunkedDecoder::default(),
        remaining,
        pending: (!first.is_empty()).then_some(first),
        done: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if state.done {
                return None;
            }
            let raw = match state.pending.take() {
                Some(raw) => raw,
                None => match read_some(&state.stream).await {
                    Ok(Some(raw)) => raw,
                    Ok(None) => {
                        state.done = true;
                        return match state.framing {
                            Framing::Chunked if !state.chunks.is_done() => Some((
                                Err(io_error(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "the stream ended mid-chunk",
                                ))),
                                state,
                            )),
                            _ => None,
                        };
                    }
                    Err(error) => {
                        state.done = true;
                        return Some((Err(io_error(error)), state));
                    }
                },
            };
            let payload = match state.framing {
                Framing::Chunked => {
                    let mut out = Vec::with_capacity(raw.len());
                    if let Err(reason) = state.chunks.decode(&raw, &mut out) {
                        state.done = true;
                        return Some((
                            Err(io_error(io::Error::new(io::ErrorKind::InvalidData, reason))),
                            state,
                        ));
                    }
                    state.done = state.chunks.is_done();
                    Bytes::from(out)
                }
                Framing::Length(_) => {
                    let take = raw.len().min(state.remaining);
                    state.remaining -= take;
                    state.done = state.remaining == 0;
                    raw.slice(..take)
                }
                Framing::UntilClose => raw,
            };
            if !payload.is_empty() {
                return Some((Ok(payload), state));
            }
        }
    })
    .boxed()
}

/// Waits until the socket is readable, holding no buffer meanwhile; `None` at end of stream.
async fn read_some(stream: &TcpStream) -> io::Result<Option<Bytes>> {
    loop {
        stream.readable().await?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(buf.freeze())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// HTTP/1.1 chunked transfer decoding, fed any split of the bytes. Pure.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    size_line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataCr,
    DataLf,
    Trailer,
    Done,
}

/// A chunk-size line longer than this is not HTTP.
const MAX_SIZE_LINE: usize = 1024;

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Appends the payload carried by `input` to `out`.
    pub fn decode(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(end) = input.iter().position(|&b| b == b'\n') else {
                        self.size_line.extend_from_slice(input);
                        if self.size_line.len() > MAX_SIZE_LINE {
                            return Err("chunk size line too long".to_owned());
                        }
                        return Ok(());
                    };
                    self.size_line.extend_from_slice(&input[..end]);
                    input = &input[end + 1..];
                    let line = std::mem::take(&mut self.size_line);
                    let line = line.trim_ascii();
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                        continue;
                    }
                    let digits = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| usize::from_str_radix(d, 16).ok())
                        .ok_or_else(|| {
                            format!("bad chunk size {:?}", String::from_utf8_lossy(line))
                        })?;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(remaining) => {
                    let take = remaining.min(input.len());
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = if take == remaining {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(remaining - take)
                    };
                }
                ChunkState::DataCr => {
                    if input[0] != b'\r' {
                        return Err("chunk data not followed by CRLF".to_owned());
                    }
                    input = &input[1..];
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if input[0] != b'\n' {
                        return Err("chunk data not followed by CRLF".to_owned());
                    }
                    input = &input[1..];
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => return Ok(()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKED: &[u8] = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nTrailer: x\r\n\r\n";

    #[test]
    fn decodes_chunks_in_any_split() {
        for split in 0..=CHUNKED.len() {
            let mut decoder = ChunkedDecoder::default();
            let mut out = Vec::new();
            decoder.decode(&CHUNKED[..split], &mut out).unwrap();
            decoder.decode(&CHUNKED[split..], &mut out).unwrap();
            assert_eq!(out, b"hello world!", "split at {split}");
            assert!(decoder.is_done());
        }
    }

    #[test]
    fn decodes_one_byte_at_a_time() {
        let mut decoder = ChunkedDecoder::default();
        let mut out = Vec::new();
        for byte in CHUNKED {
            decoder
                .decode(std::slice::from_ref(byte), &mut out)
                .unwrap();
        }
        assert_eq!(out, b"hello world!");
    }

    #[test]
    fn rejects_what_is_not_chunked() {
        for bad in [&b"zz\r\nhello\r\n"[..], b"5\r\nhelloXX", &[b'1'; 2000]] {
            let mut decoder = ChunkedDecoder::default();
            assert!(
                decoder.decode(bad, &mut Vec::new()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parses_heads() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        assert_eq!(
            parse_head(head).unwrap(),
            Some((200, Framing::Chunked, head.len() - 4))
        );
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(
            parse_head(head).unwrap(),
            Some((200, Framing::Length(12), head.len()))
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-").unwrap(), None);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }
}
