//! The files under `deploy/` are what operators copy: each must at least be
//! well-formed and agree with the code. YAML parses; Kubernetes manifests
//! name their kind; compose refers only to files that exist and publishes
//! the API and the admin tools on loopback only; every control-plane TOML
//! (also the one inside the ConfigMap) passes the control plane's own
//! loader and `validate()`; the Grafana dashboard asks only for metrics the
//! control plane exports; the systemd unit passes `systemd-analyze verify`;
//! the Containerfile builds in stages and runs as a non-root user with a
//! health check.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

/// Every file under `dir`, sorted; operator secrets are not ours to read.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "secrets") {
                    stack.push(p);
                }
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn with_ext(ext: &[&str]) -> Vec<PathBuf> {
    files(&deploy())
        .into_iter()
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ext.contains(&e))
        })
        .collect()
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The documents of a YAML file (one or more, separated by `---`).
fn yaml_docs(p: &Path) -> Vec<Yaml> {
    let text = read(p);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Yaml::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", rel(p))))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_one(p: &Path) -> Yaml {
    let mut docs = yaml_docs(p);
    assert_eq!(docs.len(), 1, "{}: expected one YAML document", rel(p));
    docs.remove(0)
}

fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// A control-plane TOML text through the control plane's own loader.
fn check_control_plane_toml(text: &str, what: &str) {
    let dir = tests::TempDir::new("deploy-toml");
    let path = dir.path().join("control-plane.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = control_plane::Config::load(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
    cfg.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn every_yaml_file_parses() {
    let yamls = with_ext(&["yaml", "yml"]);
    assert!(yamls.len() >= 10, "too few YAML files found: {yamls:?}");
    for p in &yamls {
        assert!(!yaml_docs(p).is_empty(), "{} is empty", rel(p));
    }
}

#[test]
fn kubernetes_manifests_name_their_kind_and_kustomize_lists_them_all() {
    let dir = deploy().join("k8s");
    let kustomization = yaml_one(&dir.join("kustomization.yaml"));
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("kustomization.yaml: resources")
        .iter()
        .map(|r| r.as_str().expect("resource names are strings").to_string())
        .collect();
    let mut present = BTreeSet::new();
    let mut kinds = Vec::new();
    for p in files(&dir) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name == "kustomization.yaml" || !name.ends_with(".yaml") {
            continue;
        }
        present.insert(name.clone());
        for doc in yaml_docs(&p) {
            for key in ["apiVersion", "kind"] {
                assert!(
                    doc[key].as_str().is_some_and(|s| !s.is_empty()),
                    "{name}: a document without {key}"
                );
            }
            assert!(
                str_at(&doc, &["metadata", "name"]).is_some_and(|s| !s.is_empty()),
                "{name}: a {} without metadata.name",
                doc["kind"].as_str().unwrap_or("?")
            );
            kinds.push(doc["kind"].as_str().unwrap().to_string());
            if doc["kind"] == "ConfigMap"
                && let Some(toml) = str_at(&doc, &["data", "control-plane.toml"])
            {
                check_control_plane_toml(toml, &format!("{name}: data.control-plane.toml"));
            }
        }
    }
    assert_eq!(
        listed, present,
        "kustomization.yaml must list exactly the manifests in deploy/k8s"
    );
    for kind in [
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/k8s");
    }
    // kubectl renders the kustomization offline, where it is installed.
    let kubectl = Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output();
    match kubectl {
        Ok(out) => assert!(
            out.status.success(),
            "kubectl kustomize deploy/k8s: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!("note: kubectl not installed, `kubectl kustomize` check skipped"),
    }
}

/// A compose bind mount `SRC:DST[:MODE]` whose source is a path.
fn bind_source(volume: &Yaml) -> Option<String> {
    let text = volume.as_str()?;
    let src = text.split(':').next()?;
    (src.starts_with("./") || src.starts_with("../") || src.starts_with('/'))
        .then(|| src.to_string())
}

#[test]
fn compose_refers_to_existing_files_and_keeps_admin_ports_private() {
    let base = deploy();
    let compose = yaml_one(&base.join("compose.yaml"));
    let services = compose["services"].as_mapping().expect("compose: services");
    for name in [
        "control-plane",
        "postgres",
        "mosquitto",
        "prometheus",
        "grafana",
    ] {
        assert!(
            services.contains_key(name),
            "compose.yaml has no {name} service"
        );
    }
    let secrets = compose["secrets"].as_mapping().expect("compose: secrets");
    let readme = read(&base.join("README.md"));
    for (name, s) in secrets {
        let file = s["file"].as_str().expect("secret with a file");
        let path = base.join(file);
        if let Ok(inside) = path.strip_prefix(base.join("secrets")) {
            // Created by the operator: documented, and ignored by git.
            let file_name = inside.to_string_lossy();
            assert!(
                readme.contains(&*file_name),
                "deploy/README.md does not say how to create secrets/{file_name} ({name:?})"
            );
        } else {
            assert!(path.exists(), "secret {name:?}: {file} does not exist");
        }
    }
    let ignore = read(&base.join("secrets/.gitignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        "deploy/secrets/.gitignore must ignore every secret"
    );

    let public_ports: HashSet<&str> = ["8080", "1080", "4433"].into();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if let Some(build) = svc.get("build") {
            let context = base.join(build["context"].as_str().expect("build.context"));
            assert!(context.is_dir(), "{name}: build context {context:?}");
            let file = context.join(build["dockerfile"].as_str().expect("build.dockerfile"));
            assert!(file.is_file(), "{name}: {file:?} does not exist");
        }
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            if let Some(src) = bind_source(v) {
                let p = base.join(&src);
                assert!(p.exists(), "{name}: volume source {src} does not exist");
            }
        }
        for s in svc["secrets"].as_sequence().into_iter().flatten() {
            let source = s.as_str().or_else(|| s["source"].as_str()).unwrap();
            assert!(
                secrets.contains_key(source),
                "{name}: secret {source:?} is not declared"
            );
        }
        for port in svc["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().expect("ports as strings");
            let host_port = port.split(':').rev().nth(1).unwrap_or(port);
            if !public_ports.contains(host_port) {
                assert!(
                    port.starts_with("127.0.0.1:"),
                    "{name}: {port} is published on every address; the API and admin tools stay on loopback"
                );
            }
        }
    }

    // Prometheus scrapes /metrics with the token compose mounts for it.
    let prom = yaml_one(&base.join("prometheus/prometheus.yml"));
    let job = &prom["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let token_file = job["authorization"]["credentials_file"]
        .as_str()
        .expect("prometheus: authorization.credentials_file");
    let mounted: Vec<String> = compose["services"]["prometheus"]["secrets"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|s| {
            let target = s["target"].as_str().or_else(|| s.as_str()).unwrap();
            format!("/run/secrets/{target}")
        })
        .collect();
    assert!(
        mounted.iter().any(|m| m == token_file),
        "prometheus reads {token_file}, compose mounts {mounted:?}"
    );
    let target = job["static_configs"][0]["targets"][0].as_str().unwrap();
    assert!(
        services.contains_key(target.split(':').next().unwrap()),
        "prometheus scrapes {target}, not a compose service"
    );
}

#[test]
fn grafana_dashboard_asks_for_exported_metrics() {
    // Metric families as `# TYPE name kind` declares them, with the
    // suffixes their samples carry.
    let text = control_plane::metrics::render(&control_plane::metrics::Snapshot {
        devices_by_status: vec![("online", 1)],
        exits_by_status: vec![("ready", 1)],
        ..Default::default()
    });
    let exported: HashSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| match kind {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.to_string(),
        })
        .collect();
    assert!(exported.len() >= 5, "{text}");
    let datasource = yaml_one(&deploy().join("grafana/provisioning/datasources/prometheus.yaml"));
    let uid = datasource["datasources"][0]["uid"].as_str().unwrap();
    let dashboards = with_ext(&["json"]);
    assert!(!dashboards.is_empty(), "no dashboard JSON in deploy/");
    for p in dashboards {
        let d: Json =
            serde_json::from_str(&read(&p)).unwrap_or_else(|e| panic!("{}: {e}", rel(&p)));
        assert!(
            d["title"].is_string() && d["uid"].is_string(),
            "{}",
            rel(&p)
        );
        let panels = d["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{}: no panels", rel(&p));
        for panel in panels {
            assert_eq!(panel["datasource"]["uid"], uid, "{}", rel(&p));
            for t in panel["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("cellgate_") {
                        assert!(
                            exported.contains(word),
                            "{}: {word} is not exported by /metrics",
                            rel(&p)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_toml_passes_its_loader() {
    let tomls = with_ext(&["toml"]);
    let mut control_plane = 0;
    for p in &tomls {
        let name = p.file_name().unwrap().to_string_lossy();
        if name.starts_with("edge-agent") {
            let cfg = edge_agent::config::AgentConfig::load(p)
                .unwrap_or_else(|e| panic!("{}: {e}", rel(p)));
            cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", rel(p)));
        } else {
            check_control_plane_toml(&read(p), &rel(p));
            control_plane += 1;
        }
    }
    assert!(control_plane >= 3, "control-plane TOML files: {tomls:?}");
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = deploy().join("systemd/cellgate-control-plane.service");
    let text = read(&unit);
    for line in [
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "StateDirectory=cellgate",
        "Restart=on-failure",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == line),
            "the unit lacks {line}"
        );
    }
    assert!(
        text.lines().any(|l| l.starts_with("LimitNOFILE=")),
        "the unit lacks LimitNOFILE"
    );
    assert!(
        text.contains("--config /etc/cellgate/control-plane.toml serve"),
        "ExecStart should serve with the installed configuration"
    );

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("note: systemd-analyze not installed, `systemd-analyze verify` skipped");
        return;
    }
    // verify checks that ExecStart is executable: point it at the built
    // binary, in a copy with the same file name.
    let bin = tests::control_plane_bin();
    let dir = tests::TempDir::new("deploy-unit");
    let copy = dir.path().join("cellgate-control-plane.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/control-plane", &bin.display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown keys are only warned about, on lines that name the unit.
    let about_unit: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("cellgate-control-plane"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {report}"
    );
}

#[test]
fn containerfile_builds_in_stages_and_runs_unprivileged() {
    let text = read(&deploy().join("Containerfile"));
    // Instructions, with continuation lines joined.
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (k.to_ascii_uppercase(), v.trim().to_string())
        })
        .collect();
    let known = [
        "FROM",
        "ARG",
        "RUN",
        "COPY",
        "ADD",
        "WORKDIR",
        "ENV",
        "USER",
        "EXPOSE",
        "VOLUME",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "STOPSIGNAL",
        "LABEL",
        "SHELL",
    ];
    for (k, _) in &instructions {
        assert!(known.contains(&k.as_str()), "unknown instruction {k}");
    }
    let all = |k: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(i, _)| i == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert!(
        all("FROM").len() >= 2,
        "a builder stage and a runtime stage"
    );
    let user = all("USER");
    let last_user = user.last().expect("a USER line");
    assert!(
        !last_user.starts_with("root") && !last_user.starts_with('0'),
        "runs as {last_user}"
    );
    let health = all("HEALTHCHECK");
    assert!(
        health.iter().any(|h| h.contains("/health")),
        "HEALTHCHECK must probe /health: {health:?}"
    );
    let exposed = all("EXPOSE").join(" ");
    for port in ["8080", "1080", "8000", "4433/udp"] {
        assert!(exposed.contains(port), "EXPOSE lacks {port}: {exposed}");
    }
    // Files copied from the build context (the repository root) exist.
    for c in all("COPY") {
        if c.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = c.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "COPY source {src} does not exist"
            );
        }
    }
}
