//! Watching uplinks: link up/down and address changes, as the kernel
//! announces them on rtnetlink multicast groups (link, IPv4 and IPv6
//! addresses), typically within a millisecond of the change.
//!
//! Events are changes of state, not raw notifications: the watcher keeps
//! what it last reported per interface, so a link the kernel announces as
//! up twice yields one [`LinkEvent::LinkUp`], and an IPv6 address finishing
//! duplicate detection is not "added" twice. The state it starts from is
//! read before [`watch_links`] returns, so every change made after the call
//! is reported.
//!
//! If the netlink socket fails (or overflows and loses notifications), the
//! watcher logs it, subscribes again after a backoff, re-reads the current
//! state and reports the difference to what it last reported, so a change
//! that happened meanwhile is not lost.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::link::{LinkState, all_link_states};

/// Events buffered for a slow reader before the watcher waits for it.
const CHANNEL_DEPTH: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A subscription that lived this long resets the backoff.
const STABLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LinkEvent {
    /// Administratively up and carrying traffic (`IFF_UP`, `IFF_RUNNING`
    /// and `IFF_LOWER_UP`; see [`LinkState::up`]).
    LinkUp {
        ifname: String,
    },
    /// Down, lost its carrier, or removed.
    LinkDown {
        ifname: String,
    },
    AddrAdded {
        ifname: String,
        addr: IpAddr,
    },
    AddrRemoved {
        ifname: String,
        addr: IpAddr,
    },
}

impl LinkEvent {
    pub fn ifname(&self) -> &str {
        match self {
            LinkEvent::LinkUp { ifname }
            | LinkEvent::LinkDown { ifname }
            | LinkEvent::AddrAdded { ifname, .. }
            | LinkEvent::AddrRemoved { ifname, .. } => ifname,
        }
    }
}

/// Watch `interfaces` (all interfaces when empty). Must be called within a
/// Tokio runtime; the watcher runs as a task until the receiver is dropped.
/// Fails only when the first netlink subscription cannot be made.
pub fn watch_links(interfaces: Vec<String>) -> io::Result<mpsc::Receiver<LinkEvent>> {
    // Subscribe first, then read the state: a change between the two is
    // then both in the state and announced, and the announcement is a no-op.
    let subscription = subscribe()?;
    let tracker = Tracker::new(interfaces, snapshot()?);
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    tokio::spawn(run(tx, tracker, subscription));
    Ok(rx)
}

type Messages = futures::channel::mpsc::UnboundedReceiver<(
    NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;
type Connection = rtnetlink::proto::Connection<RouteNetlinkMessage>;

fn subscribe() -> io::Result<(Connection, Messages)> {
    let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])?;
    Ok((conn, messages))
}

async fn run(tx: mpsc::Sender<LinkEvent>, mut tracker: Tracker, first: (Connection, Messages)) {
    let mut subscription = Some(first);
    let mut backoff = BACKOFF_MIN;
    loop {
        let (conn, mut messages) = match subscription.take() {
            Some(s) => s,
            None => match subscribe().and_then(|s| Ok((s, snapshot()?))) {
                Ok((s, snap)) => {
                    for event in tracker.resync(snap) {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    s
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "link watcher cannot subscribe");
                    if !pause(&tx, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let started = tokio::time::Instant::now();
        tokio::pin!(conn);
        let why = loop {
            let message = tokio::select! {
                _ = &mut conn => break "the netlink connection ended",
                _ = tx.closed() => return,
                m = messages.next() => match m {
                    Some((m, _)) => m,
                    None => break "the netlink socket stopped",
                },
            };
            let events = match message.payload {
                NetlinkPayload::InnerMessage(m) => {
                    change_of(m).map(|c| tracker.apply(c)).unwrap_or_default()
                }
                NetlinkPayload::Overrun(_) => {
                    warn!("link watcher lost notifications (socket buffer full); re-reading state");
                    match snapshot() {
                        Ok(snap) => tracker.resync(snap),
                        Err(_) => break "re-reading interfaces failed",
                    }
                }
                _ => Vec::new(),
            };
            for event in events {
                debug!(?event, "link event");
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        };
        if started.elapsed() >= STABLE {
            backoff = BACKOFF_MIN;
        }
        warn!(reason = why, retry_in = ?backoff, "link watcher restarting");
        if !pause(&tx, &mut backoff).await {
            return;
        }
    }
}

/// Sleep for the backoff and double it; `false` when the receiver went away.
async fn pause(tx: &mpsc::Sender<LinkEvent>, backoff: &mut Duration) -> bool {
    let delay = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = tx.closed() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// What the watcher tracks for one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tracked {
    up: bool,
    addrs: BTreeSet<IpAddr>,
}

/// Interfaces by name with their index, as read from the kernel.
#[derive(Debug, Default)]
struct Snapshot {
    links: HashMap<String, (Option<u32>, Tracked)>,
}

fn snapshot() -> io::Result<Snapshot> {
    let states = all_link_states()?;
    Ok(Snapshot {
        links: states
            .into_iter()
            .map(|(name, st)| {
                let index = nix::net::if_::if_nametoindex(name.as_str()).ok();
                (name, (index, tracked(&st)))
            })
            .collect(),
    })
}

fn tracked(st: &LinkState) -> Tracked {
    Tracked {
        up: st.up,
        addrs: st.addrs.iter().copied().collect(),
    }
}

/// One kernel notification, reduced to what the tracker needs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    Link {
        index: u32,
        name: Option<String>,
        up: bool,
    },
    LinkGone {
        index: u32,
        name: Option<String>,
    },
    Addr {
        index: u32,
        /// The IPv4 label, used when the index is not known yet.
        label: Option<String>,
        addr: IpAddr,
        present: bool,
    },
}

fn change_of(msg: RouteNetlinkMessage) -> Option<Change> {
    match msg {
        RouteNetlinkMessage::NewLink(m) => Some(Change::Link {
            index: m.header.index,
            up: m
                .header
                .flags
                .contains(LinkFlags::Up | LinkFlags::Running | LinkFlags::LowerUp),
            name: link_name(&m),
        }),
        RouteNetlinkMessage::DelLink(m) => Some(Change::LinkGone {
            index: m.header.index,
            name: link_name(&m),
        }),
        RouteNetlinkMessage::NewAddress(m) => addr_change(&m, true),
        RouteNetlinkMessage::DelAddress(m) => addr_change(&m, false),
        _ => None,
    }
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn addr_change(m: &AddressMessage, present: bool) -> Option<Change> {
    // IFA_LOCAL is the interface's own address; on a point-to-point link
    // IFA_ADDRESS is the peer's.
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    let label = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Label(l) => Some(l.clone()),
        _ => None,
    });
    Some(Change::Addr {
        index: m.header.index,
        label,
        addr: local.or(address)?,
        present,
    })
}

/// The reported state, and the rules that turn notifications into events.
struct Tracker {
    /// Watched names; empty: all.
    filter: Vec<String>,
    names: HashMap<u32, String>,
    links: HashMap<String, Tracked>,
}

impl Tracker {
    fn new(filter: Vec<String>, snap: Snapshot) -> Self {
        let mut t = Tracker {
            filter,
            names: HashMap::new(),
            links: HashMap::new(),
        };
        for (name, (index, state)) in snap.links {
            if let Some(index) = index {
                t.names.insert(index, name.clone());
            }
            if t.watched(&name) {
                t.links.insert(name, state);
            }
        }
        t
    }

    fn watched(&self, name: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|f| f == name)
    }

    fn apply(&mut self, change: Change) -> Vec<LinkEvent> {
        let mut events = Vec::new();
        match change {
            Change::Link { index, name, up } => {
                let Some(name) = name.or_else(|| self.names.get(&index).cloned()) else {
                    return events;
                };
                if let Some(old) = self.names.insert(index, name.clone())
                    && old != name
                {
                    // Renamed: what was known under the old name is stale.
                    self.links.remove(&old);
                }
                if !self.watched(&name) {
                    return events;
                }
                let st = self.links.entry(name.clone()).or_default();
                if st.up != up {
                    st.up = up;
                    events.push(if up {
                        LinkEvent::LinkUp { ifname: name }
                    } else {
                        LinkEvent::LinkDown { ifname: name }
                    });
                }
            }
            Change::LinkGone { index, name } => {
                let known = self.names.remove(&index);
                let Some(name) = name.or(known) else {
                    return events;
                };
                if let Some(st) = self.links.remove(&name) {
                    events.extend(gone_events(&name, st));
                }
            }
            Change::Addr {
                index,
                label,
                addr,
                present,
            } => {
                let name = self.names.get(&index).cloned().or_else(|| {
                    // An IPv4 label is the interface name, or `name:alias`.
                    label.map(|l| l.split(':').next().unwrap_or(&l).to_string())
                });
                let Some(name) = name else {
                    return events;
                };
                if !self.watched(&name) {
                    return events;
                }
                let st = self.links.entry(name.clone()).or_default();
                if present && st.addrs.insert(addr) {
                    events.push(LinkEvent::AddrAdded { ifname: name, addr });
                } else if !present && st.addrs.remove(&addr) {
                    events.push(LinkEvent::AddrRemoved { ifname: name, addr });
                }
            }
        }
        events
    }

    /// Take `snap` as the truth and report how it differs from what was
    /// reported before.
    fn resync(&mut self, snap: Snapshot) -> Vec<LinkEvent> {
        let mut events = Vec::new();
        let mut now: HashMap<String, Tracked> = HashMap::new();
        self.names.clear();
        for (name, (index, state)) in snap.links {
            if let Some(index) = index {
                self.names.insert(index, name.clone());
            }
            if self.watched(&name) {
                now.insert(name, state);
            }
        }
        let mut before = std::mem::take(&mut self.links);
        for (name, new) in &now {
            let old = before.remove(name).unwrap_or_default();
            for addr in old.addrs.difference(&new.addrs) {
                events.push(LinkEvent::AddrRemoved {
                    ifname: name.clone(),
                    addr: *addr,
                });
            }
            if old.up != new.up {
                events.push(if new.up {
                    LinkEvent::LinkUp {
                        ifname: name.clone(),
                    }
                } else {
                    LinkEvent::LinkDown {
                        ifname: name.clone(),
                    }
                });
            }
            for addr in new.addrs.difference(&old.addrs) {
                events.push(LinkEvent::AddrAdded {
                    ifname: name.clone(),
                    addr: *addr,
                });
            }
        }
        for (name, old) in before {
            events.extend(gone_events(&name, old));
        }
        self.links = now;
        events
    }
}

fn gone_events(name: &str, st: Tracked) -> Vec<LinkEvent> {
    let mut events: Vec<LinkEvent> = st
        .addrs
        .into_iter()
        .map(|addr| LinkEvent::AddrRemoved {
            ifname: name.to_string(),
            addr,
        })
        .collect();
    if st.up {
        events.push(LinkEvent::LinkDown {
            ifname: name.to_string(),
        });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn snap(entries: &[(&str, u32, bool, &[&str])]) -> Snapshot {
        Snapshot {
            links: entries
                .iter()
                .map(|(name, index, up, addrs)| {
                    (
                        name.to_string(),
                        (
                            Some(*index),
                            Tracked {
                                up: *up,
                                addrs: addrs.iter().map(|a| ip(a)).collect(),
                            },
                        ),
                    )
                })
                .collect(),
        }
    }

    fn link(index: u32, name: &str, up: bool) -> Change {
        Change::Link {
            index,
            name: Some(name.to_string()),
            up,
        }
    }

    fn addr(index: u32, a: &str, present: bool) -> Change {
        Change::Addr {
            index,
            label: None,
            addr: ip(a),
            present,
        }
    }

    fn up(n: &str) -> LinkEvent {
        LinkEvent::LinkUp { ifname: n.into() }
    }

    fn down(n: &str) -> LinkEvent {
        LinkEvent::LinkDown { ifname: n.into() }
    }

    #[test]
    fn repeated_notifications_are_one_event() {
        let mut t = Tracker::new(vec![], snap(&[("wwan0", 3, false, &[])]));
        assert_eq!(t.apply(link(3, "wwan0", false)), vec![]);
        assert_eq!(t.apply(link(3, "wwan0", true)), vec![up("wwan0")]);
        assert_eq!(t.apply(link(3, "wwan0", true)), vec![]);
        let added = LinkEvent::AddrAdded {
            ifname: "wwan0".into(),
            addr: ip("10.64.1.2"),
        };
        assert_eq!(t.apply(addr(3, "10.64.1.2", true)), vec![added]);
        assert_eq!(t.apply(addr(3, "10.64.1.2", true)), vec![]);
        assert_eq!(t.apply(link(3, "wwan0", false)), vec![down("wwan0")]);
        assert_eq!(
            t.apply(addr(3, "10.64.1.2", false)),
            vec![LinkEvent::AddrRemoved {
                ifname: "wwan0".into(),
                addr: ip("10.64.1.2")
            }]
        );
        assert_eq!(t.apply(addr(3, "10.64.1.2", false)), vec![]);
    }

    #[test]
    fn unwatched_interfaces_are_silent() {
        let mut t = Tracker::new(
            vec!["wwan1".into()],
            snap(&[("wwan0", 3, true, &[]), ("wwan1", 4, true, &[])]),
        );
        assert_eq!(t.apply(link(3, "wwan0", false)), vec![]);
        assert_eq!(t.apply(addr(3, "10.0.0.1", true)), vec![]);
        assert_eq!(t.apply(link(4, "wwan1", false)), vec![down("wwan1")]);
        // An address notification for an index never seen, with a label.
        let labelled = Change::Addr {
            index: 99,
            label: Some("wwan1:0".into()),
            addr: ip("10.0.0.9"),
            present: true,
        };
        assert_eq!(t.apply(labelled).len(), 1);
    }

    #[test]
    fn a_new_link_coming_up_and_going_away() {
        let mut t = Tracker::new(vec![], snap(&[]));
        assert_eq!(t.apply(link(7, "usb0", true)), vec![up("usb0")]);
        t.apply(addr(7, "192.168.8.100", true));
        let gone = t.apply(Change::LinkGone {
            index: 7,
            name: None,
        });
        assert_eq!(
            gone,
            vec![
                LinkEvent::AddrRemoved {
                    ifname: "usb0".into(),
                    addr: ip("192.168.8.100")
                },
                down("usb0")
            ]
        );
        assert!(t.apply(addr(7, "192.168.8.100", false)).is_empty());
    }

    #[test]
    fn resync_reports_what_changed_meanwhile() {
        let mut t = Tracker::new(
            vec![],
            snap(&[("wwan0", 3, true, &["10.64.1.2"]), ("wwan1", 4, true, &[])]),
        );
        let events = t.resync(snap(&[
            ("wwan0", 3, true, &["10.64.9.9"]),
            ("usb0", 5, true, &[]),
        ]));
        let expect = [
            LinkEvent::AddrRemoved {
                ifname: "wwan0".into(),
                addr: ip("10.64.1.2"),
            },
            LinkEvent::AddrAdded {
                ifname: "wwan0".into(),
                addr: ip("10.64.9.9"),
            },
            up("usb0"),
            down("wwan1"),
        ];
        assert_eq!(events.len(), expect.len(), "{events:?}");
        for e in expect {
            assert!(events.contains(&e), "{e:?} missing from {events:?}");
        }
        // Nothing changed: nothing reported.
        assert!(
            t.resync(snap(&[
                ("wwan0", 3, true, &["10.64.9.9"]),
                ("usb0", 5, true, &[])
            ]))
            .is_empty()
        );
        assert_eq!(t.apply(link(5, "usb0", true)), vec![]);
    }

    #[test]
    fn rename_forgets_the_old_name() {
        let mut t = Tracker::new(vec![], snap(&[("eth1", 6, true, &[])]));
        assert_eq!(t.apply(link(6, "wwan5", true)), vec![up("wwan5")]);
        assert!(!t.links.contains_key("eth1"));
    }

    #[tokio::test]
    async fn watcher_starts_and_stops_with_its_receiver() {
        let rx = watch_links(vec!["cgnosuch0".into()]).unwrap();
        drop(rx);
        // The task notices the closed channel and ends; nothing to assert
        // beyond not hanging.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
