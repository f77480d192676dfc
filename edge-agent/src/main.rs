//! `edge-agent`: enroll a device, then keep its tunnel up.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use edge_agent::AgentConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version = edge_agent::AGENT_VERSION,
    about = "cellgate edge agent: carries customer traffic out of this device's uplink"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Trade a one-time enrollment token for this device's identity.
    Enroll {
        /// The token printed by `control-plane enroll-token create`.
        token: String,
        /// Where to store the identity.
        #[arg(long, env = "CELLGATE_AGENT_STATE_DIR", default_value_os_t = edge_agent::config::default_state_dir())]
        state_dir: PathBuf,
        /// Reach the control plane at this `host:port` instead of the token's address.
        #[arg(long)]
        control_plane: Option<String>,
    },
    /// Connect to the control plane and serve customer flows. Also applies
    /// self-updates the control plane sends (signed releases), restarting
    /// with the same arguments, and rolls back an update whose binary does
    /// not reach the control plane.
    Run {
        /// TOML configuration file (see deploy/edge-agent.example.toml).
        #[arg(long, env = "CELLGATE_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// Where `enroll` stored the identity (default /var/lib/cellgate-agent).
        #[arg(long, env = "CELLGATE_AGENT_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Reach the control plane at this `host:port` instead of the enrolled address.
        #[arg(long)]
        control_plane: Option<String>,
        /// Allow private, loopback and link-local targets (tests and demos only).
        #[arg(long)]
        allow_private_targets: bool,
        /// Runtime threads: 1 (default) or more; 0 = one per CPU core.
        #[arg(long, env = "CELLGATE_AGENT_WORKER_THREADS")]
        worker_threads: Option<usize>,
    },
}

fn main() -> std::process::ExitCode {
    shared::process::init_logging();
    shared::process::raise_fd_limit();
    match real_main(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One thread (the default) suits devices: a single core outruns any
/// mobile uplink, and it avoids cross-thread wake-ups on every packet.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

/// Replace this process with a fresh start of the same binary and
/// arguments (same PID, so a service manager sees no exit).
fn reexec() {
    let err = match std::env::current_exe() {
        Ok(exe) => edge_agent::update::exec(&exe),
        Err(e) => e,
    };
    eprintln!("edge-agent: restarting failed: {err}; exiting so the service manager restarts it");
    std::process::exit(75);
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Enroll {
            token,
            state_dir,
            control_plane,
        } => {
            let id = runtime(1)?.block_on(edge_agent::enroll::enroll(
                &token,
                &state_dir,
                control_plane.as_deref(),
            ))?;
            println!(
                "enrolled as {} ({}); identity stored in {}",
                id.meta.device_id,
                id.meta.device_name,
                state_dir.display()
            );
            println!(
                "start it with: edge-agent run --state-dir {}",
                state_dir.display()
            );
            Ok(())
        }
        Cmd::Run {
            config,
            state_dir,
            control_plane,
            allow_private_targets,
            worker_threads,
        } => {
            let mut cfg = match &config {
                Some(path) => AgentConfig::load(path)?,
                None => AgentConfig::default(),
            };
            cfg.config_path = config;
            edge_agent::commands::install_restarter(std::sync::Arc::new(reexec));
            if let Some(d) = state_dir {
                cfg.state_dir = d;
            }
            if control_plane.is_some() {
                cfg.control_plane = control_plane;
            }
            if let Some(n) = worker_threads {
                cfg.worker_threads = n;
            }
            cfg.allow_private_targets |= allow_private_targets;
            cfg.validate()?;
            // May re-execute the previous binary (rollback of an update).
            edge_agent::update::on_start(&cfg.state_dir)?;
            runtime(cfg.worker_threads)?.block_on(async move {
                let shutdown = CancellationToken::new();
                let s = shutdown.clone();
                tokio::spawn(async move {
                    shared::process::wait_for_signal().await;
                    s.cancel();
                });
                edge_agent::update::enable(
                    &cfg.state_dir,
                    std::time::Duration::from_secs(cfg.update_deadline_secs),
                    shutdown.clone(),
                );
                edge_agent::tunnel::run(cfg, shutdown).await
            })?;
            if edge_agent::update::restart_requested() {
                return Err(edge_agent::update::exec_new());
            }
            Ok(())
        }
    }
}
