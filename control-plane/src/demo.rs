//! `control-plane demo`: the whole system on one machine, in one process.
//! The in-process agent enrolls through the real enrollment path and
//! connects over real QUIC on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::{valid_password, valid_username};
use crate::config::Config;
use crate::proxy::auth::hash_password;
use crate::tokens;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// HTTP proxy port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// SOCKS5 proxy port on 127.0.0.1.
    #[arg(long, default_value_t = 1080)]
    pub socks_port: u16,
    /// REST API port on 127.0.0.1.
    #[arg(long, default_value_t = 8000)]
    pub api_port: u16,
    /// QUIC (UDP) port for the agent on 127.0.0.1.
    #[arg(long, default_value_t = 4433)]
    pub quic_port: u16,
    /// The demo customer as USER:PASS (default: demo and a random password).
    #[arg(long, value_name = "USER:PASS")]
    pub customer: Option<String>,
    /// Let customers reach private and loopback targets (local testing).
    #[arg(long)]
    pub allow_private_targets: bool,
    /// Write the bound addresses as JSON to this file once ready.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// Run the demo. `base` is the configuration file's content (or the
/// defaults); the demo overrides the listeners (loopback, the given ports)
/// and the data directory (`data_dir`, else a temporary one).
pub async fn run(
    args: DemoArgs,
    base: Config,
    data_dir: Option<PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (data_dir, temporary) = match &data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "cellgate-demo-{}",
                hex::encode(rand::random::<[u8; 4]>())
            )),
            true,
        ),
    };
    let (user, pass) = match &args.customer {
        Some(c) => {
            let (u, p) = c
                .split_once(':')
                .context("--customer must look like USER:PASS")?;
            (u.to_string(), p.to_string())
        }
        None => ("demo".to_string(), hex::encode(rand::random::<[u8; 8]>())),
    };
    anyhow::ensure!(
        valid_username(&user),
        "customer name: {}",
        crate::api::USERNAME_RULE
    );
    valid_password(&pass).map_err(|e| anyhow::anyhow!("customer password: {e}"))?;

    let lo = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let cfg = Config {
        data_dir: data_dir.clone(),
        http_listen: lo(args.http_port),
        socks_listen: lo(args.socks_port),
        api_listen: lo(args.api_port),
        quic_listen: lo(args.quic_port),
        allow_private_targets: args.allow_private_targets || base.allow_private_targets,
        ..base
    };
    let app = crate::app::start(cfg).await?;
    let state = app.state.clone();
    let admin = match &app.initial_admin_token {
        Some(t) => t.clone(),
        None => tokens::create_admin_token(&state.store, "demo").await?,
    };

    let hash = {
        let p = pass.clone();
        tokio::task::spawn_blocking(move || hash_password(&p))
            .await?
            .map_err(anyhow::Error::msg)?
    };
    if !state.store.set_customer_password(&user, &hash).await? {
        let id = format!("cus-{}", hex::encode(rand::random::<[u8; 6]>()));
        state.store.insert_customer(&id, &user, &hash).await?;
    }
    state.auth.invalidate(&user);

    let agent_dir = data_dir.join("demo-agent");
    if !edge_agent::identity::Identity::exists(&agent_dir) {
        let addr = tokens::agent_addr(&state.cfg, Some(app.addrs));
        let issued =
            tokens::create_enroll_token(&state.store, &state.pki, addr, "demo-agent", 600).await?;
        edge_agent::enroll::enroll(&issued.token, &agent_dir, None)
            .await
            .context("enrolling the demo agent")?;
    }
    let agent_cfg = edge_agent::AgentConfig {
        state_dir: agent_dir,
        allow_private_targets: args.allow_private_targets,
        ..Default::default()
    };
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::tunnel::run(agent_cfg, agent_stop.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while state.registry.online_count() == 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the demo agent did not come online within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(f) = &args.ready_file {
        tokens::write_json_atomically(f, &app.addrs)?;
    }
    print_banner(
        &app.addrs,
        &user,
        &pass,
        &admin,
        &state,
        &data_dir,
        temporary,
        args.allow_private_targets,
    );

    shutdown.cancelled().await;
    agent_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    app.shutdown().await;
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_banner(
    a: &crate::state::BoundAddrs,
    user: &str,
    pass: &str,
    admin: &str,
    state: &crate::state::State,
    data_dir: &std::path::Path,
    temporary: bool,
    private_ok: bool,
) {
    let device = state
        .registry
        .snapshot()
        .first()
        .map(|s| format!("{} ({})", s.name, s.device_id))
        .unwrap_or_default();
    let keep = if temporary {
        " (temporary, removed on exit)"
    } else {
        ""
    };
    println!(
        r#"
cellgate demo is running
  data directory  {data}{keep}
  device          {device}, online over QUIC at {quic}
  HTTP proxy      http://{http}
  SOCKS5 proxy    socks5h://{socks}
  REST API        http://{api}
  customer        {user} / {pass}
  admin token     {admin}

Try it:
  curl -x http://{user}:{pass}@{http} https://example.com/
  curl --socks5-hostname {socks} --proxy-user {user}:{pass} https://example.com/
  curl -H 'Authorization: Bearer {admin}' http://{api}/api/v1/devices
"#,
        data = data_dir.display(),
        quic = a.quic,
        http = a.http,
        socks = a.socks,
        api = a.api,
    );
    if private_ok {
        println!(
            "Private and loopback targets are allowed (--allow-private-targets), e.g.:\n  python3 -m http.server 9000 &  curl -x http://{user}:{pass}@{} http://127.0.0.1:9000/\n",
            a.http
        );
    } else {
        println!(
            "Private and loopback targets are refused; add --allow-private-targets to reach servers on this machine.\n"
        );
    }
    println!("Press Ctrl-C to stop.");
}
