//! Networking of one exit: sockets bound to the exit's uplink interface,
//! DNS through that interface, the public-address check, and watching links
//! and addresses.
//!
//! Everything here takes `interface: Option<&str>`; `None` means "the host's
//! routing decides" (an agent with a single uplink) and behaves exactly as
//! plain Tokio does.
//!
//! Glossary:
//! - **uplink interface**: the network device one modem appears as
//!   (`wwan0`, `usb0`, `enx…`). Binding a socket to it (`SO_BINDTODEVICE`,
//!   needs `CAP_NET_RAW`) makes its traffic leave through that modem
//!   whatever the host's default route is ([`bind`]).
//! - **exit nameservers**: the resolvers an exit's DNS queries go to,
//!   through its uplink ([`dns::Resolver`]). A loopback stub such as
//!   systemd-resolved's `127.0.0.53` cannot be reached through a modem
//!   interface, so an exit with an interface needs `dns = [...]`
//!   nameservers reachable through that uplink.
//! - **IP echo**: an HTTP endpoint that answers with the caller's address;
//!   asked through the uplink it gives the exit's public address
//!   ([`echo::external_ip`]).
//! - **ready**: an uplink that is up, has carrier and a usable address
//!   ([`link::wait_ready`]); [`watch::watch_links`] reports the changes.
//!
//! Modules:
//! - [`bind`]: `connect_tcp`, `udp_socket`.
//! - [`dns`]: pure DNS codec and the per-uplink resolver.
//! - [`http`]: a small bounded HTTP/1.1 client.
//! - [`echo`]: the public-address check.
//! - [`link`]: interface state, waiting for readiness, link up/down.
//! - [`watch`]: link and address events from rtnetlink.

pub mod bind;
pub mod dns;
pub mod echo;
pub mod http;
pub mod link;
pub mod watch;
