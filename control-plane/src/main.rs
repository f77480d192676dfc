//! `control-plane`: serve, run the demo, and administer from the shell.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use control_plane::Config;
use control_plane::demo::DemoArgs;
use control_plane::store::{Store, StoreError};
use control_plane::{pki::Pki, tokens};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "control-plane",
    version,
    about = "cellgate control plane: proxy ingress, device fleet and REST API"
)]
struct Cli {
    /// TOML configuration file (see deploy/control-plane.example.toml).
    #[arg(long, global = true, env = "CELLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, PKI); overrides the configuration file.
    /// For `demo`, omit it to use a temporary directory removed on exit.
    #[arg(long, global = true, env = "CELLGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL, `sqlite://PATH` or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`; overrides the
    /// configuration file. Default: SQLite `cellgate.db` in the data
    /// directory. Prefer the environment variable: a flag shows up in `ps`.
    #[arg(
        long,
        global = true,
        env = "CELLGATE_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane.
    Serve(ServeArgs),
    /// Run everything locally with an in-process demo agent.
    Demo(DemoArgs),
    /// Device enrollment tokens.
    #[command(subcommand)]
    EnrollToken(EnrollCmd),
    /// Proxy customers.
    #[command(subcommand)]
    Customer(CustomerCmd),
    /// Admin API tokens.
    #[command(subcommand)]
    AdminToken(AdminCmd),
    /// Devices of the running control plane: list, show, rotate.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Signed agent releases: publish a build, list them.
    #[command(subcommand)]
    Release(ReleaseCmd),
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Hash and sign an edge-agent binary with the release key and store
    /// it in the database; devices then update to it with
    /// `POST /api/v1/devices/{id}/update` or a rollout.
    Publish {
        /// The edge-agent binary.
        binary: PathBuf,
        /// The version it reports (`edge-agent --version`).
        #[arg(long)]
        version: String,
        /// Its target triple, e.g. x86_64-unknown-linux-gnu or
        /// aarch64-unknown-linux-gnu.
        #[arg(long)]
        target: String,
        /// Sign with this key file instead of the configured release key
        /// (created when missing). Agents accept only the key they received
        /// at enrollment.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// List published releases.
    List,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// List devices with their status and exits.
    List,
    /// Show one device (JSON): exits, addresses, telemetry, counters.
    Show { id: String },
    /// Rotate a device's exit now and wait for the outcome.
    Rotate {
        id: String,
        /// The exit to rotate (needed when the device has several).
        #[arg(long)]
        exit: Option<String>,
    },
    /// The last rotations of a device.
    Rotations {
        id: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Create a rotation link: a secret URL that rotates the exit when
    /// fetched (`curl URL`), at most once per --min-interval-secs.
    RotationLink {
        id: String,
        #[arg(long)]
        exit: Option<String>,
        #[arg(long)]
        min_interval_secs: Option<u64>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// HTTP proxy address (default 0.0.0.0:8080).
    #[arg(long, env = "CELLGATE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// SOCKS5 proxy address (default 0.0.0.0:1080).
    #[arg(long, env = "CELLGATE_SOCKS_LISTEN")]
    socks_listen: Option<SocketAddr>,
    /// REST API address (default 127.0.0.1:8000).
    #[arg(long, env = "CELLGATE_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// QUIC (UDP) address agents connect to (default 0.0.0.0:4433).
    #[arg(long, env = "CELLGATE_QUIC_LISTEN")]
    quic_listen: Option<SocketAddr>,
    /// host:port agents dial (goes into enrollment tokens).
    #[arg(long, env = "CELLGATE_PUBLIC_ADDR")]
    public_addr: Option<String>,
    /// Let customers reach private and loopback targets (tests, local demos).
    #[arg(long)]
    allow_private_targets: bool,
    /// Write the bound addresses as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EnrollCmd {
    /// Create a one-time token for a new device and print it.
    Create {
        /// The device's name.
        #[arg(long)]
        name: String,
        /// Lifetime in seconds (default: enroll_token_ttl_secs, 24 h).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
}

#[derive(Subcommand)]
enum CustomerCmd {
    /// Add a customer (asks for the password on standard input unless --password is given).
    Add {
        /// Username: 1-64 characters from A-Z a-z 0-9 _ . -
        name: String,
        /// At least 8 characters.
        #[arg(long, env = "CELLGATE_CUSTOMER_PASSWORD")]
        password: Option<String>,
    },
    /// List customers.
    List,
    /// Delete a customer by name or id.
    Delete {
        /// Username or customer id.
        name: String,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Create another admin token and print it (e.g. when the first one was lost).
    Create {
        #[arg(long, default_value = "cli")]
        label: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shared::process::init_logging();
    shared::process::raise_fd_limit();
    match real_main(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control-plane: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(u) = &cli.database_url {
        cfg.database_url = Some(u.clone());
    }
    Ok(cfg)
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = load_config(&cli)?;
    match cli.command {
        Cmd::Serve(a) => {
            if let Some(x) = a.http_listen {
                cfg.http_listen = x;
            }
            if let Some(x) = a.socks_listen {
                cfg.socks_listen = x;
            }
            if let Some(x) = a.api_listen {
                cfg.api_listen = x;
            }
            if let Some(x) = a.quic_listen {
                cfg.quic_listen = x;
            }
            if a.public_addr.is_some() {
                cfg.public_addr = a.public_addr;
            }
            cfg.allow_private_targets |= a.allow_private_targets;
            let app = control_plane::app::start(cfg).await?;
            if let Some(t) = &app.initial_admin_token {
                println!("admin token (shown once; store it safely): {t}");
            }
            if let Some(f) = &a.ready_file {
                tokens::write_json_atomically(f, &app.addrs).context("writing the ready file")?;
            }
            shared::process::wait_for_signal().await;
            app.shutdown().await;
            Ok(())
        }
        Cmd::Demo(a) => {
            let stop = CancellationToken::new();
            let s = stop.clone();
            tokio::spawn(async move {
                shared::process::wait_for_signal().await;
                s.cancel();
            });
            control_plane::demo::run(a, cfg, cli.data_dir.clone(), stop).await
        }
        Cmd::EnrollToken(EnrollCmd::Create { name, ttl_secs }) => {
            anyhow::ensure!(
                tokens::valid_name(&name),
                "--name: 1-64 characters from A-Z a-z 0-9 _ . -"
            );
            let ttl = ttl_secs.unwrap_or(cfg.enroll_token_ttl_secs);
            anyhow::ensure!(ttl > 0, "--ttl-secs must be positive");
            let store = Store::open(&cfg).await?;
            let pki = Pki::load_or_create(&cfg.data_dir.join("pki"))?;
            let addr = tokens::agent_addr(&cfg, None);
            let issued = tokens::create_enroll_token(&store, &pki, addr, &name, ttl).await?;
            store.close().await;
            eprintln!(
                "enrollment token for {name:?} (one use, agents dial {}, expires at unix time {}):",
                issued.control_plane, issued.expires_at
            );
            eprintln!("on the device: edge-agent enroll TOKEN --state-dir /var/lib/cellgate-agent");
            println!("{}", issued.token);
            Ok(())
        }
        Cmd::Customer(c) => {
            let store = Store::open(&cfg).await?;
            let r = customer(&store, c).await;
            store.close().await;
            r
        }
        Cmd::Device(c) => device(&cfg, c).await,
        Cmd::Release(c) => release(&cfg, c).await,
        Cmd::AdminToken(AdminCmd::Create { label }) => {
            let store = Store::open(&cfg).await?;
            let t = tokens::create_admin_token(&store, &label).await?;
            store.close().await;
            println!("{t}");
            Ok(())
        }
    }
}

/// Call the running control plane's API with a short-lived admin token.
async fn api_call(
    cfg: &Config,
    method: &str,
    path: &str,
    body: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let addrs = tokens::read_runtime(&cfg.data_dir).with_context(|| {
        format!(
            "the control plane does not seem to run with data directory {} (no {} there)",
            cfg.data_dir.display(),
            tokens::RUNTIME_FILE
        )
    })?;
    let mut api = addrs.api;
    if api.ip().is_unspecified() {
        api.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let store = Store::open(cfg).await?;
    let token = tokens::create_admin_token(&store, "cli (temporary)").await?;
    let url = format!("http://{api}{path}");
    let auth = format!("Bearer {token}");
    let headers: Vec<(&str, &str)> = vec![
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let res = edge_agent::net::http::send(
        edge_agent::net::http::Request {
            method,
            url: &url,
            headers: &headers,
            body: body.as_bytes(),
        },
        None,
        timeout,
    )
    .await;
    let _ = store.delete_admin_token(&tokens::sha256_hex(&token)).await;
    store.close().await;
    let res = res.with_context(|| format!("calling {url}"))?;
    let v = serde_json::from_slice(&res.body).unwrap_or(serde_json::Value::Null);
    Ok((res.status, v))
}

fn api_error(status: u16, v: &serde_json::Value) -> anyhow::Error {
    let msg = v["error"]["message"].as_str().unwrap_or("request failed");
    anyhow::anyhow!("{msg} (HTTP {status})")
}

async fn device(cfg: &Config, cmd: DeviceCmd) -> anyhow::Result<()> {
    use std::time::Duration;
    let short = Duration::from_secs(30);
    match cmd {
        DeviceCmd::List => {
            let (st, v) = api_call(cfg, "GET", "/api/v1/devices", "", short).await?;
            anyhow::ensure!(st == 200, api_error(st, &v));
            println!("ID\tNAME\tSTATUS\tKIND\tEXITS");
            for d in v.as_array().into_iter().flatten() {
                let exits: Vec<String> = d["exits"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        format!(
                            "{}={}{}",
                            e["name"].as_str().unwrap_or("?"),
                            e["status"].as_str().unwrap_or("?"),
                            e["external_ip"]
                                .as_str()
                                .map(|ip| format!("@{ip}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    d["id"].as_str().unwrap_or(""),
                    d["name"].as_str().unwrap_or(""),
                    d["status"].as_str().unwrap_or(""),
                    d["kind"].as_str().unwrap_or(""),
                    exits.join(" ")
                );
            }
        }
        DeviceCmd::Show { id } => {
            let (st, v) = api_call(cfg, "GET", &format!("/api/v1/devices/{id}"), "", short).await?;
            anyhow::ensure!(st == 200, api_error(st, &v));
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        DeviceCmd::Rotate { id, exit } => {
            let body = serde_json::json!({ "exit": exit }).to_string();
            // Drain, attempts and pauses: allow the configured worst case.
            let r = &cfg.rotation;
            let worst = r.drain_grace_secs
                + u64::from(r.attempts) * (r.attempt_timeout_secs + r.retry_delay_secs)
                + 60;
            eprintln!(
                "rotating {id} (drain up to {} s, up to {} attempts)...",
                r.drain_grace_secs, r.attempts
            );
            let (st, v) = api_call(
                cfg,
                "POST",
                &format!("/api/v1/devices/{id}/rotate?cause=cli"),
                &body,
                Duration::from_secs(worst),
            )
            .await?;
            let rot = &v["rotation"];
            if st == 200 {
                println!(
                    "rotated {}/{}: {} -> {} in {} ms ({} attempt(s))",
                    id,
                    rot["exit"].as_str().unwrap_or(""),
                    rot["old_ip"].as_str().unwrap_or("unknown"),
                    rot["new_ip"].as_str().unwrap_or("?"),
                    rot["duration_ms"],
                    rot["attempts"]
                );
            } else {
                if !rot.is_null() {
                    eprintln!("{}", serde_json::to_string_pretty(rot)?);
                }
                return Err(api_error(st, &v));
            }
        }
        DeviceCmd::Rotations { id, limit } => {
            let (st, v) = api_call(
                cfg,
                "GET",
                &format!("/api/v1/devices/{id}/rotations?limit={limit}"),
                "",
                short,
            )
            .await?;
            anyhow::ensure!(st == 200, api_error(st, &v));
            for r in v.as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}\t{} -> {}\t{} ms\t{}",
                    r["started_at"],
                    r["exit"].as_str().unwrap_or(""),
                    r["cause"].as_str().unwrap_or(""),
                    r["outcome"].as_str().unwrap_or(""),
                    r["old_ip"].as_str().unwrap_or("-"),
                    r["new_ip"].as_str().unwrap_or("-"),
                    r["duration_ms"],
                    r["error"].as_str().unwrap_or("")
                );
            }
        }
        DeviceCmd::RotationLink {
            id,
            exit,
            min_interval_secs,
        } => {
            let body = serde_json::json!({ "exit": exit, "min_interval_secs": min_interval_secs })
                .to_string();
            let (st, v) = api_call(
                cfg,
                "POST",
                &format!("/api/v1/devices/{id}/rotation-links"),
                &body,
                short,
            )
            .await?;
            anyhow::ensure!(st == 201, api_error(st, &v));
            eprintln!(
                "rotation link {} for {id}/{} (at most once per {} s; revoke with DELETE /api/v1/rotation-links/{}):",
                v["id"].as_str().unwrap_or(""),
                v["exit"].as_str().unwrap_or(""),
                v["min_interval_secs"],
                v["id"].as_str().unwrap_or("")
            );
            println!("{}", v["url"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

async fn release(cfg: &Config, cmd: ReleaseCmd) -> anyhow::Result<()> {
    use control_plane::release::{self, ReleaseKey};
    match cmd {
        ReleaseCmd::Publish {
            binary,
            version,
            target,
            key,
        } => {
            let len = std::fs::metadata(&binary)
                .with_context(|| binary.display().to_string())?
                .len();
            anyhow::ensure!(
                len > 0 && len <= release::MAX_SIZE,
                "{}: {len} bytes; a release holds 1..={} bytes",
                binary.display(),
                release::MAX_SIZE
            );
            let data = std::fs::read(&binary).with_context(|| binary.display().to_string())?;
            let key = ReleaseKey::load_or_create(&key.unwrap_or_else(|| cfg.release_key_path()))?;
            let store = Store::open(cfg).await?;
            let r = release::publish(&store, &key, &data, &version, &target).await;
            store.close().await;
            let row = match r {
                Ok(row) => row,
                Err(release::PublishError::Store(StoreError::Conflict(_))) => {
                    anyhow::bail!("release {version} for {target} exists already")
                }
                Err(e) => return Err(e.into()),
            };
            println!(
                "published {} for {} ({} bytes, sha256 {}, signed by {})",
                row.version, row.target, row.size, row.sha256, row.key_id
            );
        }
        ReleaseCmd::List => {
            let store = Store::open(cfg).await?;
            let rows = store.releases().await;
            store.close().await;
            println!("VERSION\tTARGET\tSIZE\tSHA256\tPUBLISHED");
            for r in rows? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    r.version, r.target, r.size, r.sha256, r.created_at
                );
            }
        }
    }
    Ok(())
}

async fn customer(store: &Store, cmd: CustomerCmd) -> anyhow::Result<()> {
    match cmd {
        CustomerCmd::Add { name, password } => {
            anyhow::ensure!(
                control_plane::api::valid_username(&name),
                "name: {}",
                control_plane::api::USERNAME_RULE
            );
            anyhow::ensure!(
                !control_plane::proxy::principal::login_conflicts_with_params(&name),
                "name: it contains a routing parameter name (such as country or session) between dashes; choose another"
            );
            let password = match password {
                Some(p) => p,
                None => {
                    eprint!("password for {name}: ");
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            control_plane::api::valid_password(&password).map_err(anyhow::Error::msg)?;
            let hash = tokio::task::spawn_blocking(move || {
                control_plane::proxy::auth::hash_password(&password)
            })
            .await?
            .map_err(anyhow::Error::msg)?;
            let id = format!("cus-{}", hex::encode(rand::random::<[u8; 6]>()));
            match store.insert_customer(&id, &name, &hash).await {
                Ok(_) => println!("customer {name} added ({id})"),
                Err(StoreError::Conflict(_)) => anyhow::bail!("customer {name} already exists"),
                Err(e) => return Err(e.into()),
            }
        }
        CustomerCmd::List => {
            for c in store.customers().await? {
                println!(
                    "{}\t{}\t{}",
                    c.id,
                    c.username,
                    if c.disabled { "disabled" } else { "active" }
                );
            }
        }
        CustomerCmd::Delete { name } => match store.delete_customer(&name).await? {
            Some(n) => println!("customer {n} deleted"),
            None => anyhow::bail!("no customer {name}"),
        },
    }
    Ok(())
}
