//! Customer ingress: the HTTP and SOCKS5 proxies, their pure codecs, the
//! authenticator, and the path from a customer's target to a device exit.

pub mod auth;
pub mod error;
pub mod exit;
pub mod http;
pub mod http_head;
pub mod socks;
pub mod socks5;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::state::State;

#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    Http,
    Socks5,
}

/// Accept customers until shutdown; each connection is its own task.
pub async fn serve(
    listener: TcpListener,
    protocol: Protocol,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    debug!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        shared::quic::relay::enable_keepalive(&tcp);
        let state = state.clone();
        let shutdown = shutdown.clone();
        state.tasks.clone().spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = async {
                    match protocol {
                        Protocol::Http => http::handle(tcp, peer, &state).await,
                        Protocol::Socks5 => socks::handle(tcp, peer, &state).await,
                    }
                } => {}
            }
        });
    }
}
