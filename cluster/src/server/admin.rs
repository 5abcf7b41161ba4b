//! The admin HTTP listener's connections: `/metrics`, `/health` and the other answers of
//! [`crate::metrics::admin_response`], one bounded request per connection.

use std::sync::Arc;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::metrics::{self, ShardMetrics};

use super::stop::StopToken;

use super::stop::unless;

/// Answers one admin HTTP request (bounded head, bounded by shutdown) and closes.
pub(super) async fn serve_admin(
    mut stream: TcpStream,
    all: &[Arc<ShardMetrics>],
    shutdown: &StopToken,
) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !metrics::head_complete(&head) {
        if head.len() >= metrics::ADMIN_REQUEST_BYTES_MAX {
            return;
        }
        let read = unless(stream.read(&mut chunk), shutdown.cancelled()).await;
        match read {
            Some(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let shards: Vec<&ShardMetrics> = all.iter().map(|m| m.as_ref()).collect();
    let response = metrics::admin_response(&head, &shards);
    let _ = stream.write_all(&response).await;
    let _ = stream.close().await;
}
