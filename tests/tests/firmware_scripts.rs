//! The device installers in `firmware-scripts/`, run as a user runs them.
//!
//! - **Raspberry Pi**: `install.sh --root` stages a full install and enrolls
//!   the real agent against a real control plane; `make-image` edits a small
//!   generated SD card image (MBR, FAT32 boot, ext4 root) without root, and
//!   the result is read back with mtools and debugfs.
//! - **Android**: `install.sh` talks to a fake `adb` (a shell script written
//!   by the test) whose phone is a temporary directory; its `shell` runs the
//!   commands on this machine, so the phone's `edge-agent enroll` is the real
//!   agent enrolling against the test's control plane.
//! - **OpenWrt**: `install.sh --root` and the procd init script.
//!
//! The image tools (sfdisk, mtools, dosfstools, e2fsprogs) are installed by
//! `tests/run.sh`; a missing tool fails the test with the package to install.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tests::harness::process::{command, edge_agent_bin, run_bounded};
use tests::{Cluster, ClusterOpts, TempDir};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

// ---- helpers -----------------------------------------------------------------

fn firmware_scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("firmware-scripts")
}

/// `name` on PATH or in the sbin directories (Debian keeps sfdisk, debugfs
/// and mkfs.fat there, off a normal user's PATH).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Each `(tool, package)`, or a failed test saying what to install.
fn require(tools: &[(&str, &str)]) {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .map(|(tool, pkg)| format!("{tool} (package {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "missing tools: {}; tests/run.sh installs them (apt-get install {})",
        missing.join(", "),
        tools
            .iter()
            .filter(|(tool, _)| find_tool(tool).is_none())
            .map(|(_, pkg)| *pkg)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

const IMAGE_TOOLS: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("mcopy", "mtools"),
    ("mdir", "mtools"),
    ("mtype", "mtools"),
    ("mkfs.fat", "dosfstools"),
    ("mke2fs", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
];

/// A tool as a command (found in sbin too), with the harness's clean
/// environment.
fn tool(name: &str) -> Command {
    let path = find_tool(name).unwrap_or_else(|| panic!("{name} not found"));
    command(path)
}

/// One of the installers, run with bash or sh as its first line says.
fn script(rel: &str) -> Command {
    let path = firmware_scripts().join(rel);
    assert!(path.is_file(), "{} is missing", path.display());
    command(path)
}

fn run(cmd: Command) -> Output {
    run_bounded(cmd, SCRIPT_TIMEOUT)
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn expect_ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn expect_fail(out: Output, what: &str, message: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} should have failed: {}",
        text(&out)
    );
    assert!(
        stderr.contains(message),
        "{what}: expected {message:?} in stderr: {}",
        text(&out)
    );
    stderr
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: &Path, data: impl AsRef<[u8]>) {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn write_exec(path: &Path, data: &str) {
    write(path, data);
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A control plane without agents and a fresh enrollment token.
fn control_plane_with_token(name: &str, device: &str) -> (Cluster, String) {
    let c = Cluster::start(ClusterOpts {
        agents: 0,
        ..ClusterOpts::named(name)
    });
    let token = c.create_enroll_token(device, None);
    (c, token)
}

/// The control plane lists a device called `name`.
fn assert_device_listed(c: &Cluster, name: &str) {
    let devices = c.api().get("/api/v1/devices").json();
    let found = devices
        .as_array()
        .is_some_and(|v| v.iter().any(|d| d["name"].as_str() == Some(name)));
    assert!(found, "device {name} not listed: {devices}");
}

const AGENT_CONFIG: &str =
    "# test config\nstate_dir = \"/var/lib/cellgate-agent\"\nconnect_timeout_secs = 7\n";

// ---- every script --------------------------------------------------------------

#[test]
fn every_script_parses_and_passes_shellcheck() {
    let scripts = [
        ("raspberry-pi/install.sh", "bash"),
        ("raspberry-pi/make-image", "bash"),
        ("raspberry-pi/firstboot.sh", "sh"),
        ("android/install.sh", "bash"),
        ("android/magisk-service.sh", "sh"),
        ("android/termux-boot.sh", "sh"),
        ("openwrt/install.sh", "bash"),
        ("openwrt/cellgate-agent.init", "sh"),
    ];
    for (rel, shell) in scripts {
        let path = firmware_scripts().join(rel);
        assert_eq!(
            mode(&path) & 0o111,
            0o111,
            "{rel} must be executable (mode {:o})",
            mode(&path)
        );
        let first = read(&path).lines().next().unwrap_or_default().to_string();
        assert!(
            first.starts_with("#!") && first.contains(if shell == "bash" { "bash" } else { "sh" }),
            "{rel}: unexpected first line {first:?}"
        );
        let mut cmd = command(shell);
        cmd.arg("-n").arg(&path);
        expect_ok(run(cmd), &format!("{shell} -n {rel}"));
    }
    match find_tool("shellcheck") {
        Some(sc) => {
            let mut cmd = command(sc);
            cmd.args(["-x", "-S", "style"]);
            for (rel, _) in scripts {
                cmd.arg(firmware_scripts().join(rel));
            }
            expect_ok(run(cmd), "shellcheck");
        }
        None => eprintln!("note: shellcheck is not installed; only the -n syntax checks ran"),
    }
}

// ---- Raspberry Pi: install.sh ----------------------------------------------------

#[test]
fn pi_install_stages_hardened_unit_and_enrolls() {
    let (c, token) = control_plane_with_token("pi-install", "pi-01");
    let dir = TempDir::new("pi-install");
    let root = dir.join("root");
    let config = dir.join("edge-agent.toml");
    write(&config, AGENT_CONFIG);

    let mut cmd = script("raspberry-pi/install.sh");
    cmd.arg("--root")
        .arg(&root)
        .arg("--binary")
        .arg(edge_agent_bin())
        .arg("--config")
        .arg(&config)
        .args(["--token", &token]);
    let stdout = expect_ok(run(cmd), "install.sh --root");
    assert!(stdout.contains("enrolled as"), "no enrollment: {stdout}");
    assert_device_listed(&c, "pi-01");

    let bin = root.join("usr/local/bin/edge-agent");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(fs::read(&bin).unwrap(), fs::read(edge_agent_bin()).unwrap());
    let cfg = root.join("etc/cellgate/edge-agent.toml");
    assert_eq!(read(&cfg), AGENT_CONFIG);
    assert_eq!(mode(&cfg), 0o640, "the config may hold passwords");
    let state = root.join("var/lib/cellgate-agent");
    assert_eq!(mode(&state), 0o700, "the state dir holds the private key");
    assert!(state.join("identity.json").is_file());

    let unit_path = root.join("etc/systemd/system/cellgate-agent.service");
    assert_eq!(mode(&unit_path), 0o644);
    let unit = read(&unit_path);
    for line in [
        "User=cellgate-agent",
        "ExecStart=/usr/local/bin/edge-agent run --config /etc/cellgate/edge-agent.toml --state-dir /var/lib/cellgate-agent",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/cellgate-agent",
        "AmbientCapabilities=CAP_NET_RAW CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_RAW CAP_NET_ADMIN",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "unit lacks {line:?}:\n{unit}"
        );
    }
    assert!(
        !unit.contains("CAP_SYS_ADMIN") && !unit.contains("PrivateDevices=yes"),
        "no extra privileges, and modem serial ports stay reachable:\n{unit}"
    );

    // A second run (an upgrade) keeps the identity and does not spend a token.
    let mut cmd = script("raspberry-pi/install.sh");
    cmd.arg("--root")
        .arg(&root)
        .arg("--binary")
        .arg(edge_agent_bin())
        .args(["--token", "cgt1_unused"]);
    let stdout = expect_ok(run(cmd), "install.sh --root again");
    assert!(stdout.contains("already enrolled"), "{stdout}");
    assert_eq!(read(&cfg), AGENT_CONFIG, "the installed config is kept");

    // A bad token is a clear failure.
    let mut cmd = script("raspberry-pi/install.sh");
    cmd.arg("--root")
        .arg(dir.join("other-root"))
        .arg("--binary")
        .arg(edge_agent_bin())
        .args(["--token", "cgt1_not-a-token"]);
    expect_fail(run(cmd), "install.sh with a bad token", "enrollment failed");
}

#[test]
fn pi_units_pass_systemd_analyze_verify() {
    let Some(analyze) = find_tool("systemd-analyze") else {
        eprintln!("note: systemd-analyze is not installed; unit verification skipped");
        return;
    };
    // verify checks that every ExecStart is executable: point them at the
    // built agent and the script, in copies with the same file names.
    let dir = TempDir::new("pi-units");
    let pi = firmware_scripts().join("raspberry-pi");
    let agent = read(&pi.join("cellgate-agent.service")).replace(
        "/usr/local/bin/edge-agent",
        &edge_agent_bin().display().to_string(),
    );
    let firstboot = read(&pi.join("cellgate-firstboot.service")).replace(
        "/usr/local/lib/cellgate/firstboot.sh",
        &pi.join("firstboot.sh").display().to_string(),
    );
    write(&dir.join("cellgate-agent.service"), agent);
    write(&dir.join("cellgate-firstboot.service"), firstboot);
    let mut cmd = command(analyze);
    cmd.arg("verify")
        .arg(dir.join("cellgate-agent.service"))
        .arg(dir.join("cellgate-firstboot.service"));
    let out = run(cmd);
    let report = text(&out);
    // Unknown keys are only warned about, on lines that name the unit.
    assert!(
        out.status.success() && !report.contains(".service:"),
        "systemd-analyze verify: {report}"
    );
}

// ---- Raspberry Pi: make-image ------------------------------------------------------

const SECTOR: u64 = 512;
const BOOT_START: u64 = 2048;

/// A small image with Raspberry Pi OS's layout: MBR, partition 1 FAT32
/// (type c), partition 2 ext4 (type 83) up to the end.
struct PiImage {
    path: PathBuf,
    root_start: u64,
}

impl PiImage {
    fn build(dir: &Path, name: &str, boot_mib: u64, root_mib: u64) -> Self {
        let path = dir.join(name);
        let boot_sectors = boot_mib * 1024 * 1024 / SECTOR;
        let root_start = BOOT_START + boot_sectors;
        let total = root_start * SECTOR + root_mib * 1024 * 1024;
        fs::File::create(&path).unwrap().set_len(total).unwrap();
        let layout = format!(
            "label: dos\nstart={BOOT_START}, size={boot_sectors}, type=c, bootable\nstart={root_start}, type=83\n"
        );
        sfdisk(&path, &layout);

        let boot = dir.join(format!("{name}.boot"));
        fs::File::create(&boot)
            .unwrap()
            .set_len(boot_sectors * SECTOR)
            .unwrap();
        let mut cmd = tool("mkfs.fat");
        cmd.args(["-F", "32", "-n", "BOOTFS"]).arg(&boot);
        expect_ok(run(cmd), "mkfs.fat");

        // A root file system with the directories Raspberry Pi OS has.
        let tree = dir.join(format!("{name}.tree"));
        for d in [
            "etc/systemd/system/multi-user.target.wants",
            "usr/local/bin",
            "var/lib",
        ] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        write(&tree.join("etc/hostname"), "raspberrypi\n");
        let root = dir.join(format!("{name}.root"));
        fs::File::create(&root)
            .unwrap()
            .set_len(root_mib * 1024 * 1024)
            .unwrap();
        let mut cmd = tool("mke2fs");
        cmd.args(["-q", "-F", "-t", "ext4", "-L", "rootfs", "-d"])
            .arg(&tree)
            .arg(&root);
        expect_ok(run(cmd), "mke2fs");

        dd_into(&boot, &path, BOOT_START * SECTOR);
        dd_into(&root, &path, root_start * SECTOR);
        for f in [&boot, &root] {
            fs::remove_file(f).unwrap();
        }
        fs::remove_dir_all(&tree).unwrap();
        PiImage { path, root_start }
    }

    /// `IMG@@OFFSET` for mtools.
    fn fat(&self, image: &Path) -> String {
        format!("{}@@{}", image.display(), BOOT_START * SECTOR)
    }

    /// Partition 2 of `image` copied out to `to`, for debugfs.
    fn extract_root(&self, image: &Path, to: &Path) {
        let mut cmd = tool("dd");
        cmd.arg(format!("if={}", image.display()))
            .arg(format!("of={}", to.display()))
            .arg("bs=512")
            .arg(format!("skip={}", self.root_start))
            .arg("status=none");
        expect_ok(run(cmd), "dd (extract root)");
    }
}

fn sfdisk(image: &Path, layout: &str) {
    let script = image.with_extension("sfdisk");
    write(&script, layout);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec \"$0\" -q \"$1\" < \"$2\"")
        .arg(find_tool("sfdisk").expect("sfdisk"))
        .arg(image)
        .arg(&script);
    expect_ok(run(cmd), "sfdisk");
    fs::remove_file(script).unwrap();
}

fn dd_into(part: &Path, image: &Path, offset: u64) {
    let mut cmd = tool("dd");
    cmd.arg(format!("if={}", part.display()))
        .arg(format!("of={}", image.display()))
        .arg("bs=512")
        .arg(format!("seek={}", offset / SECTOR))
        .args(["conv=notrunc", "status=none"]);
    expect_ok(run(cmd), "dd (write partition)");
}

fn mtools(name: &str, args: &[&str]) -> String {
    let mut cmd = tool(name);
    cmd.env("MTOOLS_SKIP_CHECK", "1").args(args);
    expect_ok(run(cmd), name)
}

fn debugfs(fs_image: &Path, request: &str) -> String {
    let mut cmd = tool("debugfs");
    cmd.arg("-R").arg(request).arg(fs_image);
    expect_ok(run(cmd), &format!("debugfs -R {request:?}"))
}

/// `Mode:  0755` and `User: 0 Group: 0` from debugfs `stat`.
fn assert_inode(fs_image: &Path, path: &str, kind: &str, want_mode: &str) -> String {
    let stat = debugfs(fs_image, &format!("stat {path}"));
    assert!(
        stat.contains(&format!("Type: {kind}")),
        "{path} is not a {kind}:\n{stat}"
    );
    let mode = stat
        .split("Mode:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default();
    assert_eq!(mode, want_mode, "{path} mode:\n{stat}");
    let owner: String = stat
        .lines()
        .find(|l| l.starts_with("User:"))
        .unwrap_or_default()
        .split_whitespace()
        .take(4)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(owner, "User: 0 Group: 0", "{path} owner:\n{stat}");
    stat
}

fn sha256(path: &Path) -> String {
    tests::sha256_file(path).0
}

fn make_image(img: &PiImage, out: &Path, binary: &Path, config: &Path, token: &str) -> Command {
    let mut cmd = script("raspberry-pi/make-image");
    cmd.arg("--image")
        .arg(&img.path)
        .arg("--output")
        .arg(out)
        .arg("--binary")
        .arg(binary)
        .arg("--config")
        .arg(config)
        .args(["--token", token]);
    cmd
}

#[test]
fn make_image_writes_agent_first_boot_unit_and_token() {
    require(IMAGE_TOOLS);
    let dir = TempDir::new("make-image");
    let img = PiImage::build(dir.path(), "raspios.img", 40, 32);
    let before = sha256(&img.path);
    // A stand-in binary: the image only carries it.
    let binary = dir.join("edge-agent");
    write(
        &binary,
        (0..300_000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let config = dir.join("edge-agent.toml");
    write(&config, AGENT_CONFIG);
    let token = "cgt1_eyJhIjoiMTI3LjAuMC4xOjQ0MzMifQ.test-token";
    let out = dir.join("pi-01.img");

    let mut cmd = make_image(&img, &out, &binary, &config, token);
    cmd.args(["--control-plane", "cp.example.net:4433"]);
    expect_ok(run(cmd), "make-image");
    assert_eq!(sha256(&img.path), before, "the input image is not modified");
    assert_eq!(
        fs::metadata(&out).unwrap().len(),
        fs::metadata(&img.path).unwrap().len()
    );

    // Boot partition: the token (and the address override) for first boot.
    let fat = img.fat(&out);
    let listing = mtools("mdir", &["-i", &fat, "::cellgate"]);
    assert!(listing.contains("enroll-token"), "{listing}");
    assert_eq!(
        mtools("mtype", &["-i", &fat, "::cellgate/enroll-token"]).trim(),
        token
    );
    assert_eq!(
        mtools("mtype", &["-i", &fat, "::cellgate/control-plane"]).trim(),
        "cp.example.net:4433"
    );

    // Root partition: binary, config, units, the enabled first-boot unit.
    let rootfs = dir.join("root.ext4");
    img.extract_root(&out, &rootfs);
    let mut fsck = tool("e2fsck");
    fsck.arg("-fn").arg(&rootfs);
    expect_ok(run(fsck), "e2fsck -fn on the edited root partition");

    assert_inode(&rootfs, "/usr/local/bin/edge-agent", "regular", "0755");
    let dumped = dir.join("dumped-agent");
    debugfs(
        &rootfs,
        &format!("dump /usr/local/bin/edge-agent {}", dumped.display()),
    );
    assert_eq!(sha256(&dumped), sha256(&binary), "binary content");
    assert_inode(&rootfs, "/etc/cellgate/edge-agent.toml", "regular", "0640");
    assert_eq!(
        debugfs(&rootfs, "cat /etc/cellgate/edge-agent.toml"),
        AGENT_CONFIG
    );
    assert_inode(
        &rootfs,
        "/usr/local/lib/cellgate/firstboot.sh",
        "regular",
        "0755",
    );
    assert_eq!(
        debugfs(&rootfs, "cat /usr/local/lib/cellgate/firstboot.sh"),
        read(&firmware_scripts().join("raspberry-pi/firstboot.sh"))
    );
    for unit in ["cellgate-agent.service", "cellgate-firstboot.service"] {
        let path = format!("/etc/systemd/system/{unit}");
        assert_inode(&rootfs, &path, "regular", "0644");
        assert_eq!(
            debugfs(&rootfs, &format!("cat {path}")),
            read(&firmware_scripts().join("raspberry-pi").join(unit))
        );
    }
    let link = assert_inode(
        &rootfs,
        "/etc/systemd/system/multi-user.target.wants/cellgate-firstboot.service",
        "symlink",
        "0777",
    );
    assert!(
        link.contains("\"/etc/systemd/system/cellgate-firstboot.service\""),
        "the wants link points at the unit:\n{link}"
    );
    // The agent unit is not enabled in the image: first boot enables it
    // once enrollment succeeded.
    let wants = debugfs(&rootfs, "ls /etc/systemd/system/multi-user.target.wants");
    assert!(!wants.contains("cellgate-agent.service"), "{wants}");
    assert!(debugfs(&rootfs, "cat /etc/hostname").contains("raspberrypi"));

    // Running it again over its own output replaces the files cleanly.
    let again = dir.join("pi-01-again.img");
    let mut cmd = make_image(
        &PiImage {
            path: out.clone(),
            root_start: img.root_start,
        },
        &again,
        &binary,
        &config,
        "cgt1_second",
    );
    cmd.arg("--force");
    expect_ok(run(cmd), "make-image on its own output");
    let fat = img.fat(&again);
    assert_eq!(
        mtools("mtype", &["-i", &fat, "::cellgate/enroll-token"]).trim(),
        "cgt1_second"
    );
}

#[test]
fn make_image_refuses_wrong_layouts_small_roots_and_missing_tools() {
    require(IMAGE_TOOLS);
    let dir = TempDir::new("make-image-errors");
    let config = dir.join("edge-agent.toml");
    write(&config, AGENT_CONFIG);
    let small_binary = dir.join("small-agent");
    write(&small_binary, vec![1u8; 4096]);

    // One partition only.
    let single = dir.join("single.img");
    fs::File::create(&single)
        .unwrap()
        .set_len(8 * 1024 * 1024)
        .unwrap();
    sfdisk(&single, "label: dos\nstart=2048, type=c\n");
    let img = PiImage {
        path: single,
        root_start: 0,
    };
    let out = dir.join("out.img");
    expect_fail(
        run(make_image(&img, &out, &small_binary, &config, "cgt1_x")),
        "make-image on a one-partition image",
        "expected 2 partitions",
    );
    assert!(!out.exists(), "no output after a failure");

    // GPT instead of MBR.
    let gpt = dir.join("gpt.img");
    fs::File::create(&gpt)
        .unwrap()
        .set_len(8 * 1024 * 1024)
        .unwrap();
    sfdisk(&gpt, "label: gpt\nsize=4MiB\n\n");
    let img = PiImage {
        path: gpt,
        root_start: 0,
    };
    expect_fail(
        run(make_image(&img, &out, &small_binary, &config, "cgt1_x")),
        "make-image on a GPT image",
        "expected an MBR",
    );

    // A root partition too small for the binary.
    let img = PiImage::build(dir.path(), "tiny.img", 34, 8);
    let big_binary = dir.join("big-agent");
    write(&big_binary, vec![7u8; 12 * 1024 * 1024]);
    expect_fail(
        run(make_image(&img, &out, &big_binary, &config, "cgt1_x")),
        "make-image with a too-small root",
        "root partition too small",
    );
    assert!(!out.exists(), "no output after a failure");
    assert!(
        !dir.join("out.img.partial").exists(),
        "no partial output after a failure"
    );

    // Root partition not ext4 (two FAT partitions): named as such.
    let img2 = PiImage::build(dir.path(), "notext4.img", 34, 8);
    let part = dir.join("fat2");
    fs::File::create(&part)
        .unwrap()
        .set_len(8 * 1024 * 1024)
        .unwrap();
    let mut cmd = tool("mkfs.fat");
    cmd.arg(&part);
    expect_ok(run(cmd), "mkfs.fat");
    dd_into(&part, &img2.path, img2.root_start * SECTOR);
    expect_fail(
        run(make_image(&img2, &out, &small_binary, &config, "cgt1_x")),
        "make-image with a FAT root",
        "partition 2 is not an ext2/3/4 file system",
    );

    // Missing tools: a PATH with only what the script needs to start.
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for t in ["dirname", "cat", "stat"] {
        std::os::unix::fs::symlink(find_tool(t).expect(t), bin.join(t)).unwrap();
    }
    let img = PiImage::build(dir.path(), "ok.img", 34, 8);
    let cmd = make_image(&img, &out, &small_binary, &config, "cgt1_x");
    let bash = find_tool("bash").expect("bash");
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut cmd = command(bash);
    cmd.arg(program).args(args).env("PATH", &bin);
    expect_fail(
        run(cmd),
        "make-image without mtools",
        "mcopy (package mtools)",
    );
}

// ---- Android ------------------------------------------------------------------------

/// A stand-in for `adb` and one phone. The phone's file system is
/// `$FAKE_PHONE`: `push` copies below it, `shell` runs the command line
/// with `sh` after mapping `/data/` into it, with the phone's `bin/` (a
/// fake `su`) first on PATH. Every call is appended to `$FAKE_ADB_LOG`.
const FAKE_ADB: &str = r#"#!/usr/bin/env bash
set -u
printf '%s\n' "$*" >>"$FAKE_ADB_LOG"
serial=""
if [ "${1:-}" = -s ]; then
    serial=$2
    shift 2
fi
if [ "${FAKE_ADB_NO_DEVICE:-0}" = 1 ]; then
    echo "error: no devices/emulators found" >&2
    exit 1
fi
if [ -n "$serial" ] && [ "$serial" != "$FAKE_ADB_SERIAL" ]; then
    echo "error: device '$serial' not found" >&2
    exit 1
fi
case ${1:-} in
get-state)
    echo device
    ;;
push)
    dst=$FAKE_PHONE$3
    case $3 in */) dst=$dst$(basename "$2") ;; esac
    mkdir -p "$(dirname "$dst")" && cp "$2" "$dst" || exit 1
    echo "$2: 1 file pushed, 0 skipped."
    ;;
shell)
    shift
    line="$*"
    line=${line//\/data\//$FAKE_PHONE/data/}
    PATH="$FAKE_PHONE/bin:$PATH" exec sh -c "$line"
    ;;
*)
    echo "fake adb: unsupported command: $*" >&2
    exit 1
    ;;
esac
"#;

const FAKE_SU_ROOTED: &str = r#"#!/bin/sh
[ "$1" = -c ] || { echo "su: only -c is supported here" >&2; exit 1; }
case $2 in
id) echo "uid=0(root) gid=0(root) groups=0(root) context=u:r:magisk:s0" ;;
*) exec sh -c "$2" ;;
esac
"#;

const FAKE_SU_ABSENT: &str = r#"#!/bin/sh
echo "/system/bin/sh: su: inaccessible or not found" >&2
exit 127
"#;

const SERIAL: &str = "R58M12345AB";
const TERMUX_HOME: &str = "data/data/com.termux/files/home";

struct FakePhone {
    dir: TempDir,
}

impl FakePhone {
    fn new(label: &str, rooted: bool) -> Self {
        let dir = TempDir::new(label);
        write_exec(&dir.join("host/adb"), FAKE_ADB);
        let su = if rooted {
            FAKE_SU_ROOTED
        } else {
            FAKE_SU_ABSENT
        };
        write_exec(&dir.join("phone/bin/su"), su);
        fs::create_dir_all(dir.join("phone/data/local/tmp")).unwrap();
        fs::create_dir_all(dir.join("phone").join(TERMUX_HOME)).unwrap();
        write(&dir.join("host/adb.log"), "");
        write(&dir.join("host/edge-agent.toml"), AGENT_CONFIG);
        FakePhone { dir }
    }

    fn file(&self, phone_path: &str) -> PathBuf {
        self.dir
            .join("phone")
            .join(phone_path.trim_start_matches('/'))
    }

    fn calls(&self) -> Vec<String> {
        read(&self.dir.join("host/adb.log"))
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn install(&self, token: &str, extra: &[&str]) -> Command {
        let mut cmd = script("android/install.sh");
        cmd.env("ADB", self.dir.join("host/adb"))
            .env("FAKE_PHONE", self.dir.join("phone"))
            .env("FAKE_ADB_LOG", self.dir.join("host/adb.log"))
            .env("FAKE_ADB_SERIAL", SERIAL)
            .args(["-s", SERIAL])
            .arg("--binary")
            .arg(edge_agent_bin())
            .arg("--config")
            .arg(self.dir.join("host/edge-agent.toml"))
            .args(["--token", token, "--no-start"])
            .args(extra);
        cmd
    }

    fn assert_all_calls_name_the_serial(&self) {
        let calls = self.calls();
        assert!(!calls.is_empty());
        for call in &calls {
            assert!(
                call.starts_with(&format!("-s {SERIAL} ")),
                "adb called without -s {SERIAL}: {call}"
            );
        }
    }
}

#[test]
fn android_rooted_phone_gets_magisk_boot_script_and_enrolls() {
    let (c, token) = control_plane_with_token("android-magisk", "phone-rooted");
    let phone = FakePhone::new("android-magisk", true);
    let stdout = expect_ok(
        run(phone.install(&token, &[])),
        "android install.sh (rooted)",
    );
    assert!(stdout.contains("installing for magisk"), "{stdout}");
    assert!(stdout.contains("enrolled as"), "{stdout}");
    assert_device_listed(&c, "phone-rooted");

    let bin = phone.file("/data/adb/cellgate/edge-agent");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        fs::metadata(&bin).unwrap().len(),
        fs::metadata(edge_agent_bin()).unwrap().len()
    );
    let cfg = phone.file("/data/adb/cellgate/edge-agent.toml");
    assert_eq!(read(&cfg), AGENT_CONFIG);
    assert_eq!(mode(&cfg), 0o600);
    let boot = phone.file("/data/adb/service.d/cellgate-agent.sh");
    assert_eq!(mode(&boot), 0o755, "Magisk runs only executable scripts");
    assert_eq!(
        read(&boot),
        read(&firmware_scripts().join("android/magisk-service.sh"))
    );
    let state = phone.file("/data/adb/cellgate/state");
    assert_eq!(mode(&state), 0o700);
    assert!(state.join("identity.json").is_file());
    assert!(
        !phone.file("/data/local/tmp/cellgate/setup.sh").exists()
            && !phone.file("/data/local/tmp/cellgate/edge-agent").exists(),
        "the staging area is emptied"
    );
    assert!(
        !phone.file(&format!("/{TERMUX_HOME}/.cellgate")).exists(),
        "nothing goes to Termux on a rooted phone"
    );

    phone.assert_all_calls_name_the_serial();
    let calls = phone.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.contains("shell su -c '/data/adb/cellgate/edge-agent enroll cgt1_")),
        "enrollment runs as root on the phone: {calls:#?}"
    );

    // Again: already enrolled, the token is not spent twice.
    let stdout = expect_ok(
        run(phone.install("cgt1_unused", &[])),
        "android install.sh again",
    );
    assert!(stdout.contains("already enrolled"), "{stdout}");
}

#[test]
fn android_phone_without_root_gets_termux_boot_script_and_enrolls() {
    let (c, token) = control_plane_with_token("android-termux", "phone-termux");
    let phone = FakePhone::new("android-termux", false);
    let stdout = expect_ok(
        run(phone.install(&token, &[])),
        "android install.sh (Termux)",
    );
    assert!(stdout.contains("installing for termux"), "{stdout}");
    assert!(stdout.contains("enrolled as"), "{stdout}");
    assert_device_listed(&c, "phone-termux");

    let home = format!("/{TERMUX_HOME}");
    assert_eq!(
        mode(&phone.file(&format!("{home}/.cellgate/edge-agent"))),
        0o755
    );
    assert_eq!(
        read(&phone.file(&format!("{home}/.cellgate/edge-agent.toml"))),
        AGENT_CONFIG
    );
    let boot = phone.file(&format!("{home}/.termux/boot/cellgate-agent"));
    assert_eq!(mode(&boot), 0o755);
    assert_eq!(
        read(&boot),
        read(&firmware_scripts().join("android/termux-boot.sh"))
    );
    assert!(
        phone
            .file(&format!("{home}/.cellgate/state/identity.json"))
            .is_file()
    );
    assert!(!phone.file("/data/adb/cellgate").exists());

    phone.assert_all_calls_name_the_serial();
    let calls = phone.calls();
    let su: Vec<_> = calls.iter().filter(|c| c.contains("su -c")).collect();
    assert_eq!(
        su,
        [&format!("-s {SERIAL} shell su -c id")],
        "only the root probe uses su"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.contains(&format!("shell {home}/.cellgate/edge-agent enroll cgt1_"))),
        "{calls:#?}"
    );
}

#[test]
fn android_install_fails_clearly_without_a_phone() {
    let phone = FakePhone::new("android-none", true);
    let mut cmd = phone.install("cgt1_x", &[]);
    cmd.env("FAKE_ADB_NO_DEVICE", "1");
    expect_fail(
        run(cmd),
        "android install.sh without a phone",
        "no phone ready over adb with serial R58M12345AB",
    );
    assert!(
        phone
            .calls()
            .iter()
            .all(|c| !c.contains(" push ") && !c.contains(" shell ")),
        "nothing is sent without a phone: {:#?}",
        phone.calls()
    );

    // A wrong serial is the same clear failure.
    let mut cmd = phone.install("cgt1_x", &[]);
    cmd.env("FAKE_ADB_SERIAL", "OTHER");
    expect_fail(
        run(cmd),
        "android install.sh, wrong serial",
        "no phone ready",
    );

    // And so is an adb that is not there.
    let mut cmd = phone.install("cgt1_x", &[]);
    cmd.env("ADB", phone.dir.join("host/no-such-adb"));
    expect_fail(run(cmd), "android install.sh, no adb", "adb not found");
}

// ---- OpenWrt ----------------------------------------------------------------------------

#[test]
fn openwrt_install_stages_procd_service() {
    let dir = TempDir::new("openwrt");
    let root = dir.join("files");
    let binary = dir.join("edge-agent");
    write_exec(&binary, "#!/bin/sh\necho stand-in\n");

    let mut cmd = script("openwrt/install.sh");
    cmd.arg("--root").arg(&root).arg("--binary").arg(&binary);
    let stdout = expect_ok(run(cmd), "openwrt install.sh --root");
    assert!(stdout.contains("staged in"), "{stdout}");

    assert_eq!(mode(&root.join("usr/bin/edge-agent")), 0o755);
    let init_path = root.join("etc/init.d/cellgate-agent");
    assert_eq!(mode(&init_path), 0o755);
    let init = read(&init_path);
    assert_eq!(
        init,
        read(&firmware_scripts().join("openwrt/cellgate-agent.init"))
    );
    assert!(init.starts_with("#!/bin/sh /etc/rc.common\n"));
    for needle in [
        "USE_PROCD=1",
        "start_service() {",
        "service_triggers() {",
        "procd_set_param respawn",
        "procd_set_param command \"$PROG\" run --config",
    ] {
        assert!(init.contains(needle), "init script lacks {needle:?}");
    }
    let cfg = root.join("etc/cellgate/edge-agent.toml");
    assert_eq!(mode(&cfg), 0o600);
    assert!(read(&cfg).contains("state_dir = \"/etc/cellgate/state\""));
    assert_eq!(mode(&root.join("etc/cellgate/state")), 0o700);
    assert!(read(&root.join("etc/config/cellgate")).contains("option enabled '1'"));
    assert!(read(&root.join("lib/upgrade/keep.d/cellgate-agent")).contains("/etc/cellgate/"));
    for link in ["S99cellgate-agent", "K10cellgate-agent"] {
        assert_eq!(
            fs::read_link(root.join("etc/rc.d").join(link)).unwrap(),
            Path::new("../init.d/cellgate-agent"),
            "enabled like /etc/init.d/cellgate-agent enable does"
        );
    }

    // A config given later replaces the minimal one.
    let config = dir.join("mine.toml");
    write(&config, AGENT_CONFIG);
    let mut cmd = script("openwrt/install.sh");
    cmd.arg("--root")
        .arg(&root)
        .arg("--binary")
        .arg(&binary)
        .arg("--config")
        .arg(&config);
    expect_ok(run(cmd), "openwrt install.sh --root --config");
    assert_eq!(read(&cfg), AGENT_CONFIG);

    let mut cmd = script("openwrt/install.sh");
    cmd.arg("--root")
        .arg(&root)
        .args(["--host", "root@192.0.2.1"])
        .arg("--binary")
        .arg(&binary);
    expect_fail(
        run(cmd),
        "openwrt install.sh with --root and --host",
        "exactly one of --host and --root",
    );
}
