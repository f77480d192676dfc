//! Process plumbing for the two binaries (feature `cli`): logging to
//! standard error with `RUST_LOG` filtering, and waiting for Ctrl-C or
//! SIGTERM so both shut down the same way under a terminal and systemd.

/// Log to standard error; `RUST_LOG` overrides the `info` default.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}

/// Raise the open-file soft limit to the hard limit. Every customer flow
/// holds a socket on each side, and the usual soft default (1024) would cap
/// a control plane at a few hundred concurrent flows. Call after logging is
/// set up; a failure is logged, not fatal.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => tracing::warn!(
            limit = n,
            "open-file limit is low: each customer flow needs a socket; raise the hard limit (e.g. LimitNOFILE=)"
        ),
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
}

/// Resolve on Ctrl-C or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
