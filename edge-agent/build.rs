//! Records the target triple the agent is built for: a self-update must
//! carry a release for the same target.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=CELLGATE_AGENT_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
