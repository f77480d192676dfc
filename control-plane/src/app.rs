//! Building and running the control plane: open the store and PKI, bind
//! every listener (so tests can pass port 0 and read the real ports), spawn
//! the servers, and drain them on shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::pki::Pki;
use crate::proxy::auth::Authenticator;
use crate::proxy::{self, Protocol};
use crate::registry::Registry;
use crate::state::{BoundAddrs, State};
use crate::store::Store;
use crate::tokens;

/// Time in-flight customer flows get to finish after shutdown begins.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

pub struct App {
    pub state: Arc<State>,
    pub addrs: BoundAddrs,
    /// Set when this start created the first admin token (shown once).
    pub initial_admin_token: Option<String>,
    shutdown: CancellationToken,
    servers: TaskTracker,
}

pub async fn start(cfg: Config) -> anyhow::Result<App> {
    cfg.validate()?;
    let store = Store::open(&cfg)
        .await
        .with_context(|| format!("opening the database {}", database_shown(&cfg)))?;
    let pki = Pki::load_or_create(&cfg.data_dir.join("pki"))?;
    let initial_admin_token = if store.admin_token_count().await? == 0 {
        Some(tokens::create_admin_token(&store, "initial").await?)
    } else {
        None
    };
    let bind = |a| async move {
        TcpListener::bind(a)
            .await
            .with_context(|| format!("binding {a}"))
    };
    let http = bind(cfg.http_listen).await?;
    let socks = bind(cfg.socks_listen).await?;
    let api = bind(cfg.api_listen).await?;
    let own_ips = own_ips(&cfg).await;
    let mqtt = crate::mqtt::Mqtt::new(&cfg.mqtt, &cfg.data_dir)?;
    let state = Arc::new(State {
        mqtt,
        own_ips,
        auth: Authenticator::with_limits(store.clone(), cfg.security.auth_limits()),
        cfg,
        store,
        pki,
        registry: Registry::default(),
        addrs: Default::default(),
        policy: Default::default(),
        flow_ids: Default::default(),
        tasks: TaskTracker::new(),
        rotator: Default::default(),
        router: Default::default(),
        limiter: crate::limits::Limiter::new(crate::limits::LimiterConfig::default()),
        usage: crate::usage::Usage::new(100_000),
        plans: Default::default(),
        default_plan: std::sync::Arc::new(crate::store::PlanRow::unlimited()),
    });
    let endpoint = crate::agents::endpoint(&state)
        .with_context(|| format!("binding QUIC on {}", state.cfg.quic_listen))?;
    let addrs = BoundAddrs {
        http: http.local_addr()?,
        socks: socks.local_addr()?,
        api: api.local_addr()?,
        quic: endpoint.local_addr()?,
    };
    state.set_bound(addrs);
    if let Err(e) =
        tokens::write_json_atomically(&state.cfg.data_dir.join(tokens::RUNTIME_FILE), &addrs)
    {
        warn!("cannot write the runtime file: {e}");
    }

    let shutdown = CancellationToken::new();
    let servers = TaskTracker::new();
    servers.spawn(proxy::serve(
        http,
        Protocol::Http,
        state.clone(),
        shutdown.clone(),
    ));
    servers.spawn(proxy::serve(
        socks,
        Protocol::Socks5,
        state.clone(),
        shutdown.clone(),
    ));
    servers.spawn(crate::agents::serve(
        endpoint,
        state.clone(),
        shutdown.clone(),
    ));
    servers.spawn(crate::rotation::run(state.clone(), shutdown.clone()));
    servers.spawn(crate::mqtt::run(state.clone(), shutdown.clone()));
    if let Some(range) = state.cfg.ports.range() {
        servers.spawn(crate::ports::run(state.clone(), range, shutdown.clone()));
    }
    let router = crate::api::router(state.clone());
    let s = shutdown.clone();
    servers.spawn(async move {
        let svc = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        if let Err(e) = axum::serve(api, svc)
            .with_graceful_shutdown(s.cancelled_owned())
            .await
        {
            warn!("API server: {e}");
        }
    });
    info!(
        http = %addrs.http, socks = %addrs.socks, api = %addrs.api, quic = %addrs.quic,
        data_dir = %state.cfg.data_dir.display(),
        database = %database_shown(&state.cfg),
        "control plane listening"
    );
    Ok(App {
        state,
        addrs,
        initial_admin_token,
        shutdown,
        servers,
    })
}

/// The configured database for messages, without its password.
fn database_shown(cfg: &Config) -> String {
    match &cfg.database_url {
        Some(url) => crate::store::redacted_url(url),
        None => format!(
            "sqlite://{}",
            cfg.data_dir.join(crate::store::DB_FILE).display()
        ),
    }
}

/// Specific listener IPs plus whatever the public address resolves to.
async fn own_ips(cfg: &Config) -> Vec<std::net::IpAddr> {
    let mut ips: Vec<std::net::IpAddr> = [
        cfg.http_listen,
        cfg.socks_listen,
        cfg.api_listen,
        cfg.quic_listen,
    ]
    .iter()
    .map(|a| a.ip())
    .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
    .collect();
    if let Some(public) = &cfg.public_addr {
        match tokio::net::lookup_host(public.as_str()).await {
            Ok(addrs) => ips.extend(addrs.map(|a| a.ip())),
            Err(e) => warn!("cannot resolve public_addr {public}: {e}"),
        }
    }
    ips.sort();
    ips.dedup();
    ips
}

impl App {
    /// Stop accepting, give flows a grace period, close the store.
    pub async fn shutdown(self) {
        info!("shutting down");
        self.shutdown.cancel();
        self.servers.close();
        self.state.tasks.close();
        let _ = tokio::time::timeout(DRAIN_GRACE, async {
            self.servers.wait().await;
            self.state.tasks.wait().await;
        })
        .await;
        // Flows that ended during the grace period are in memory only.
        crate::rotation::flush_counters(&self.state).await;
        crate::rotation::flush_usage(&self.state).await;
        self.state.store.close().await;
        let _ = std::fs::remove_file(self.state.cfg.data_dir.join(tokens::RUNTIME_FILE));
        info!("stopped");
    }
}
