//! Property tests of the tunnel's frame codec: every message survives a
//! round trip, no input makes a decode panic, and no input makes a decode
//! allocate more than a frame can hold, whatever lengths the payload claims.
//!
//! The allocation bound is measured with a tracking global allocator: it
//! records the largest single allocation made by a thread while that
//! thread's "armed" flag is set, so allocations by the test harness and by
//! tests running on other threads do not count. The workspace forbids
//! `unsafe`, so the allocator wrapper comes from `tracking-allocator`.

use std::alloc::System;
use std::cell::Cell;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestError, TestRunner};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::target::TargetAddr;
use shared::wire::*;
use tracking_allocator::{AllocationGroupId, AllocationRegistry, AllocationTracker, Allocator};

#[global_allocator]
static GLOBAL: Allocator<System> = Allocator::system();

thread_local! {
    // `const` so reading it from inside the allocator never allocates.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct LargestAllocation;

impl AllocationTracker for LargestAllocation {
    fn allocated(&self, _addr: usize, size: usize, _wrapped: usize, _group: AllocationGroupId) {
        if ARMED.try_with(Cell::get).unwrap_or(false) {
            LARGEST.fetch_max(size, Ordering::Relaxed);
        }
    }

    fn deallocated(
        &self,
        _: usize,
        _: usize,
        _: usize,
        _: AllocationGroupId,
        _: AllocationGroupId,
    ) {
    }
}

/// The largest single allocation `f` makes on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        AllocationRegistry::set_global_tracker(LargestAllocation).expect("one tracker");
        AllocationRegistry::enable_tracking();
    });
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, LARGEST.load(Ordering::Relaxed))
}

// ---- strategies ---------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9 .-]{1,16}", ".{0,24}"]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn device_kind() -> impl Strategy<Value = DeviceKind> {
    prop_oneof![
        Just(DeviceKind::Android),
        Just(DeviceKind::UsbModem),
        Just(DeviceKind::RaspberryPi),
        Just(DeviceKind::Linux),
    ]
}

fn device_facts() -> impl Strategy<Value = DeviceFacts> {
    (
        device_kind(),
        text(),
        text(),
        text(),
        proptest::option::of(text()),
        proptest::collection::vec(text(), 0..=MAX_LIST_ITEMS),
    )
        .prop_map(
            |(kind, hostname, model, os, operator, interfaces)| DeviceFacts {
                kind,
                hostname,
                model,
                os,
                operator,
                interfaces,
            },
        )
}

fn command_kind() -> impl Strategy<Value = CommandKind> {
    prop_oneof![
        Just(CommandKind::Ping),
        (text(), any::<u8>(), any::<u32>()).prop_map(|(exit, rung, limit_ms)| {
            CommandKind::Rotate {
                exit,
                rung,
                limit_ms,
            }
        }),
        text().prop_map(|exit| CommandKind::CheckIp { exit }),
        Just(CommandKind::RestartAgent),
        Just(CommandKind::Reboot),
        (proptest::option::of("[a-z0-9_-]{1,32}"), any::<u32>())
            .prop_map(|(exit, bytes)| CommandKind::SpeedTest { exit, bytes }),
        ".{0,200}".prop_map(|toml| CommandKind::UpdateConfig { toml }),
        (text(), text(), any::<[u8; 32]>(), any::<u64>(), bytes(80)).prop_map(
            |(version, target, sha256, size, signature)| CommandKind::SelfUpdate {
                version,
                target,
                sha256,
                size,
                signature,
            }
        ),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        text().prop_map(|interface| Event::LinkUp { interface }),
        text().prop_map(|interface| Event::LinkDown { interface }),
        (text(), text(), any::<bool>()).prop_map(|(interface, address, added)| {
            Event::AddressChanged {
                interface,
                address,
                added,
            }
        }),
        (any::<u8>(), text()).prop_map(|(level, message)| Event::Log { level, message }),
        (text(), text(), text()).prop_map(|(from_version, to_version, reason)| {
            Event::UpdateRolledBack {
                from_version,
                to_version,
                reason,
            }
        }),
    ]
}

fn exit_info() -> BoxedStrategy<ExitInfo> {
    (
        text(),
        proptest::option::of(text()),
        text(),
        proptest::collection::vec(text(), 0..=4),
    )
        .prop_map(|(name, interface, method, ladder)| ExitInfo {
            name,
            interface,
            method,
            ladder,
        })
        .boxed()
}

fn registration() -> impl Strategy<Value = Registration> {
    prop_oneof![
        Just(Registration::NotRegistered),
        Just(Registration::Home),
        Just(Registration::Searching),
        Just(Registration::Denied),
        Just(Registration::Unknown),
        Just(Registration::Roaming),
    ]
}

fn telemetry() -> BoxedStrategy<Telemetry> {
    use proptest::option::of;
    (
        (
            of(any::<i16>()),
            of(any::<i16>()),
            of(-40.0f32..40.0),
            of(-40.0f32..60.0),
            of(0u8..=5),
            of(text()),
            of(text()),
        ),
        (
            of(text()),
            of(registration()),
            of(text()),
            of(any::<u8>()),
            of(any::<bool>()),
            of(any::<i16>()),
        ),
    )
        .prop_map(
            |(
                (rssi_dbm, rsrp_dbm, rsrq_db, sinr_db, signal_bars, access_tech, band),
                (operator, registration, cell_id, battery_pct, charging, temperature_dc),
            )| Telemetry {
                rssi_dbm,
                rsrp_dbm,
                rsrq_db,
                sinr_db,
                signal_bars,
                access_tech,
                band,
                operator,
                registration,
                cell_id,
                battery_pct,
                charging,
                temperature_dc,
            },
        )
        .boxed()
}

fn exit_status() -> BoxedStrategy<ExitStatus> {
    (text(), any::<bool>(), telemetry())
        .prop_map(|(name, link_up, telemetry)| ExitStatus {
            name,
            link_up,
            telemetry,
        })
        .boxed()
}

fn command_detail() -> BoxedStrategy<CommandDetail> {
    prop_oneof![
        (
            text(),
            text(),
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(text())
        )
            .prop_map(|(exit, rung, backend_ms, verify_ms, ip)| {
                CommandDetail::Rotated {
                    exit,
                    rung,
                    backend_ms,
                    verify_ms,
                    ip,
                }
            }),
        (text(), text()).prop_map(|(exit, ip)| CommandDetail::Ip { exit, ip }),
        (text(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(exit, bytes, millis, first_byte_ms)| CommandDetail::SpeedTest {
                exit,
                bytes,
                millis,
                first_byte_ms,
            }
        ),
    ]
    .boxed()
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::IncompatibleVersion),
        Just(RejectCode::DeviceDisabled),
        Just(RejectCode::UnknownDevice),
        Just(RejectCode::ProtocolError),
    ]
}

// Message strategies are boxed: unboxed, their types nest so deep that
// generating a value overflows a test thread's stack in debug builds.
fn control_msg() -> BoxedStrategy<ControlMsg> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            text(),
            device_facts(),
            proptest::collection::vec(exit_info(), 0..=4)
        )
            .prop_map(|(min_version, max_version, agent_version, facts, exits)| {
                ControlMsg::Hello(Hello {
                    min_version,
                    max_version,
                    agent_version,
                    facts,
                    exits,
                })
            }),
        (
            any::<u16>(),
            text(),
            text(),
            any::<u32>(),
            proptest::collection::vec(any::<u16>(), 0..=MAX_LIST_ITEMS),
            proptest::collection::vec(any::<std::net::IpAddr>(), 0..=4),
            proptest::collection::vec(any::<(u16, u16)>(), 0..=4),
            text(),
            proptest::option::of((text(), text(), text(), text())),
        )
            .prop_map(
                |(
                    version,
                    device_id,
                    device_name,
                    heartbeat_interval_ms,
                    protected_ports,
                    protected_ips,
                    protected_port_ranges,
                    ip_echo_url,
                    mqtt,
                )| {
                    ControlMsg::Welcome(Welcome {
                        version,
                        device_id,
                        device_name,
                        heartbeat_interval_ms,
                        protected_ports,
                        protected_ips,
                        protected_port_ranges,
                        ip_echo_url,
                        mqtt: mqtt.map(|(url, username, password, topic_prefix)| MqttGrant {
                            url,
                            username,
                            password,
                            topic_prefix,
                        }),
                    })
                }
            ),
        (reject_code(), text())
            .prop_map(|(code, message)| ControlMsg::Reject(Reject { code, message })),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(exit_status(), 0..=3),
        )
            .prop_map(
                |(seq, active_flows, load_centi, uptime_s, bytes_up, bytes_down, exits)| {
                    ControlMsg::Heartbeat(Heartbeat {
                        seq,
                        active_flows,
                        load_centi,
                        uptime_s,
                        bytes_up,
                        bytes_down,
                        exits,
                    })
                }
            ),
        (text(), command_kind()).prop_map(|(id, kind)| ControlMsg::Command(Command { id, kind })),
        (
            text(),
            any::<bool>(),
            text(),
            proptest::option::of(command_detail())
        )
            .prop_map(|(id, ok, message, detail)| {
                ControlMsg::CommandResult(CommandResult {
                    id,
                    ok,
                    message,
                    detail,
                })
            }),
        event().prop_map(ControlMsg::Event),
    ]
    .boxed()
}

fn target() -> impl Strategy<Value = TargetAddr> {
    prop_oneof![
        // The wire carries address and port only (no IPv6 flow label or
        // scope id), and customer targets never have them.
        any::<SocketAddr>().prop_map(|a| TargetAddr::Ip(SocketAddr::new(a.ip(), a.port()))),
        (text(), any::<u16>()).prop_map(|(d, p)| TargetAddr::Domain(d, p)),
    ]
}

fn refuse_reason() -> impl Strategy<Value = RefuseReason> {
    prop_oneof![
        Just(RefuseReason::Denied),
        Just(RefuseReason::DnsFailed),
        Just(RefuseReason::ConnectionRefused),
        Just(RefuseReason::NetworkUnreachable),
        Just(RefuseReason::HostUnreachable),
        Just(RefuseReason::Timeout),
        Just(RefuseReason::ExitUnavailable),
        Just(RefuseReason::Other),
    ]
}

fn stream_msg() -> BoxedStrategy<StreamMsg> {
    prop_oneof![
        (any::<u64>(), text(), target()).prop_map(|(flow_id, exit, target)| StreamMsg::Open {
            flow_id,
            exit,
            target
        }),
        Just(StreamMsg::Opened),
        (refuse_reason(), text())
            .prop_map(|(reason, message)| StreamMsg::Refused { reason, message }),
        (text(), text()).prop_map(|(version, target)| StreamMsg::FetchRelease { version, target }),
        any::<u64>().prop_map(|size| StreamMsg::Release { size }),
    ]
    .boxed()
}

fn enroll_msg() -> BoxedStrategy<EnrollMsg> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            text(),
            bytes(100),
            device_facts()
        )
            .prop_map(|(min_version, max_version, secret, public_key, facts)| {
                EnrollMsg::Request {
                    min_version,
                    max_version,
                    secret,
                    public_key,
                    facts,
                }
            }),
        (text(), text(), bytes(2000), bytes(2000), bytes(40)).prop_map(
            |(device_id, device_name, certificate, ca_certificate, release_key)| {
                EnrollMsg::Granted {
                    device_id,
                    device_name,
                    certificate,
                    ca_certificate,
                    release_key,
                }
            }
        ),
        text().prop_map(|message| EnrollMsg::Refused { message }),
    ]
    .boxed()
}

fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn postcard_varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Valid payloads of every message type, then damaged ones: a random span
/// replaced by a varint claiming a huge length (so the claim lands on
/// every string and list length prefix sooner or later), the same with
/// that many filler bytes after it (so the claim is not refuted by the end
/// of the input), truncated, or random bytes. All framed with a header
/// matching the payload.
fn hostile_frame() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        control_msg().prop_map(|m| postcard::to_stdvec(&m).unwrap()),
        stream_msg().prop_map(|m| postcard::to_stdvec(&m).unwrap()),
        enroll_msg().prop_map(|m| postcard::to_stdvec(&m).unwrap()),
    ];
    let huge = prop_oneof![
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(MAX_FRAME_LEN as u64 + 1),
        Just(1 << 20),
        Just(1 << 30),
        Just(MAX_LIST_ITEMS as u64 + 1),
        0u64..100_000,
    ];
    (
        valid,
        huge,
        any::<prop::sample::Index>(),
        0usize..4,
        0u8..5,
        bytes(64),
    )
        .prop_map(|(payload, claim, at, span, how, noise)| {
            let mut p = payload;
            let at = at.index(p.len() + 1);
            match how {
                0 | 1 => {
                    let mut claim_bytes = Vec::new();
                    postcard_varint(claim, &mut claim_bytes);
                    if how == 1 {
                        let room = MAX_FRAME_LEN.saturating_sub(p.len() + claim_bytes.len());
                        let filler = noise.first().copied().unwrap_or(1);
                        let n = usize::try_from(claim).unwrap_or(usize::MAX).min(room);
                        claim_bytes.resize(claim_bytes.len() + n, filler);
                    }
                    let end = (at + span).min(p.len());
                    p.splice(at..end, claim_bytes);
                }
                2 => p.truncate(at),
                3 => {
                    let end = (at + span).min(p.len());
                    p.splice(at..end, noise);
                }
                _ => p = noise,
            }
            frame_of(&p)
        })
}

// ---- properties ---------------------------------------------------------

fn check_round_trip<T>(msg: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = frame_to_vec(msg).unwrap();
    prop_assert!(bytes.len() <= HEADER_LEN + MAX_FRAME_LEN);
    prop_assert_eq!(frame_len(&bytes).unwrap(), Some(bytes.len()));

    let mut buf = BytesMut::from(&bytes[..]);
    buf.extend_from_slice(b"raw stream bytes");
    let got = decode_frame::<T>(&mut buf).unwrap();
    prop_assert_eq!(got.as_ref(), Some(msg));
    prop_assert_eq!(&buf[..], b"raw stream bytes");

    for cut in 0..bytes.len() {
        // Short of the header's length: wait for more, leave the bytes be.
        let mut b = BytesMut::from(&bytes[..cut]);
        prop_assert!(decode_frame::<T>(&mut b).unwrap().is_none());
        prop_assert_eq!(b.len(), cut);
        // A header that agrees with a cut payload: an error or some other
        // message, never a panic.
        if cut >= HEADER_LEN {
            decode_all(&frame_of(&bytes[HEADER_LEN..cut]));
        }
    }
    Ok(())
}

/// Decode `input` as each message type; whatever happens, the input
/// accounting holds.
fn decode_all(input: &[u8]) {
    fn one<T: DeserializeOwned>(input: &[u8]) {
        let mut buf = BytesMut::from(input);
        match decode_frame::<T>(&mut buf) {
            Ok(Some(_)) | Err(FrameError::Malformed(_)) => {
                let total = frame_len(input).unwrap().unwrap();
                assert_eq!(buf.len(), input.len() - total, "exactly one frame consumed");
            }
            Ok(None) => assert_eq!(buf.len(), input.len(), "nothing consumed"),
            Err(FrameError::TooLarge(n)) => {
                assert!(n > MAX_FRAME_LEN);
                assert_eq!(buf.len(), input.len());
            }
        }
    }
    one::<ControlMsg>(input);
    one::<StreamMsg>(input);
    one::<EnrollMsg>(input);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn control_round_trip(msg in control_msg()) {
        check_round_trip(&msg)?;
    }

    #[test]
    fn stream_round_trip(msg in stream_msg()) {
        check_round_trip(&msg)?;
    }

    #[test]
    fn enroll_round_trip(msg in enroll_msg()) {
        check_round_trip(&msg)?;
    }

    #[test]
    fn several_frames_back_to_back(msgs in proptest::collection::vec(control_msg(), 1..5)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode_frame(m, &mut buf).unwrap();
        }
        for m in &msgs {
            let got = decode_frame::<ControlMsg>(&mut buf).unwrap();
            prop_assert_eq!(got.as_ref(), Some(m));
        }
        prop_assert!(buf.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(input in bytes(300)) {
        decode_all(&input);
    }

    #[test]
    fn arbitrary_payloads_never_panic(payload in bytes(300), tail in bytes(8)) {
        let mut input = frame_of(&payload);
        input.extend(tail);
        decode_all(&input);
    }

    #[test]
    fn hostile_frames_never_panic(input in hostile_frame()) {
        decode_all(&input);
    }
}

#[test]
fn oversized_lists_are_refused() {
    let facts = DeviceFacts {
        interfaces: vec!["wwan0".into(); MAX_LIST_ITEMS + 1],
        ..DeviceFacts::default()
    };
    let hello = ControlMsg::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "x".into(),
        facts,
        exits: vec![],
    });
    let mut buf = BytesMut::from(&frame_to_vec(&hello).unwrap()[..]);
    assert!(matches!(
        decode_frame::<ControlMsg>(&mut buf),
        Err(FrameError::Malformed(_))
    ));
}

/// Found by `decode_allocations_are_bounded`: a `Welcome` claiming
/// `u32::MAX` protected ports, followed by 65,000 one-byte varints, grew a
/// `Vec<u16>` to 128 KiB before `protected_ports` was bounded.
#[test]
fn huge_port_list_is_refused_cheaply() {
    let mut payload = vec![1, 1, 0, 0, 0]; // Welcome, version 1, "", "", 0 ms
    postcard_varint(u64::from(u32::MAX), &mut payload);
    payload.resize(MAX_FRAME_LEN, 0);
    let mut buf = BytesMut::from(&frame_of(&payload)[..]);
    let (res, largest) = largest_allocation(|| decode_frame::<ControlMsg>(&mut buf));
    assert!(matches!(res, Err(FrameError::Malformed(_))), "{res:?}");
    assert!(largest <= MAX_FRAME_LEN, "{largest}");

    let welcome = |n: usize| {
        ControlMsg::Welcome(Welcome {
            version: 1,
            device_id: "d".into(),
            device_name: "n".into(),
            heartbeat_interval_ms: 1000,
            protected_ports: vec![8080; n],
            protected_ips: vec![],
            protected_port_ranges: vec![],
            ip_echo_url: String::new(),
            mqtt: None,
        })
    };
    let mut ok = BytesMut::from(&frame_to_vec(&welcome(MAX_LIST_ITEMS)).unwrap()[..]);
    assert_eq!(
        decode_frame(&mut ok).unwrap(),
        Some(welcome(MAX_LIST_ITEMS))
    );
    let mut over = BytesMut::from(&frame_to_vec(&welcome(MAX_LIST_ITEMS + 1)).unwrap()[..]);
    assert!(decode_frame::<ControlMsg>(&mut over).is_err());
}

/// What a decode allocates is bounded by the frame limit, whatever lengths
/// the payload claims: a peer cannot make us reserve memory it never sends.
#[test]
fn decode_allocations_are_bounded() {
    // proptest's nested strategies need more than the 2 MiB default stack
    // of test threads in debug builds.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(allocations_bounded)
        .unwrap()
        .join()
        .unwrap();
}

fn allocations_bounded() {
    let inputs = prop_oneof![
        3 => hostile_frame(),
        1 => bytes(600).prop_map(|p| frame_of(&p)),
        1 => bytes(64),
    ];
    let mut runner = TestRunner::new(ProptestConfig::with_cases(10_000));
    let worst = Cell::new(0);
    let result = runner.run(&inputs, |input| {
        let buffers: [BytesMut; 3] = std::array::from_fn(|_| BytesMut::from(&input[..]));
        let [mut a, mut b, mut c] = buffers;
        let (results, largest) = largest_allocation(|| {
            (
                decode_frame::<ControlMsg>(&mut a).is_ok(),
                decode_frame::<StreamMsg>(&mut b).is_ok(),
                decode_frame::<EnrollMsg>(&mut c).is_ok(),
            )
        });
        let _ = results;
        worst.set(worst.get().max(largest));
        prop_assert!(
            largest <= MAX_FRAME_LEN,
            "a decode allocated {largest} bytes at once for a {}-byte input",
            input.len()
        );
        Ok(())
    });
    // Inputs are up to 64 KiB: show the start, not all of it.
    if let Err(TestError::Fail(why, input)) = &result {
        panic!("{why}; input starts {:02x?}", &input[..input.len().min(48)]);
    }
    result.unwrap();
    // The measurement works: decoding a big legitimate frame does allocate.
    let big = EnrollMsg::Granted {
        device_id: String::new(),
        device_name: String::new(),
        certificate: vec![7; 4000],
        ca_certificate: Vec::new(),
        release_key: vec![1; 32],
    };
    let mut buf = BytesMut::from(&frame_to_vec(&big).unwrap()[..]);
    let (msg, largest) = largest_allocation(|| decode_frame::<EnrollMsg>(&mut buf).unwrap());
    assert_eq!(msg, Some(big));
    assert!(largest >= 4000, "tracker saw only {largest} bytes");
    assert!(worst.get() <= MAX_FRAME_LEN);
}
