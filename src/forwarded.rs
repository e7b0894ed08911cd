//! Which address is the client: the TCP peer, or what a trusted proxy says.
//!
//! `X-Forwarded-For` is a list each proxy appends the address it received the
//! connection from to; anything to the left of what *our* proxies appended
//! was written by the client and can be forged. So the header is believed
//! only when the TCP peer is in `WSGATE_TRUSTED_PROXIES`, and then read from
//! the right: trusted proxies' own entries are skipped, and the first entry
//! that is not a trusted proxy is the client. If every entry is a trusted
//! proxy the left-most one is the client; with no usable header (absent, or
//! the deciding entry is not an address) it is the peer itself. A client
//! cannot escape its per-address limits by prepending entries.

use std::net::{IpAddr, SocketAddr};

use warp::http::HeaderMap;

/// A trusted proxy: one address, or a CIDR block such as `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `1.2.3.4`, `::1`, `10.0.0.0/8` or `fd00::/8`.
    pub fn parse(s: &str) -> Option<Network> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Network { addr, prefix })
    }

    /// Is `ip` inside this block? (IPv4-mapped IPv6 addresses count as IPv4.)
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Do the first `bits` bits of `a` and `b` agree?
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (whole, rest) = (bits / 8, bits % 8);
    if a.get(..whole) != b.get(..whole) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(whole), b.get(whole)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`, what a dual-stack socket reports) as
/// plain IPv4, so limits and trust lists see one address, not two.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address for a request from `peer` (see the module docs).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Network]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    // Several headers are one list, in order (RFC 9110 §5.3).
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_entry(entry) else {
            // Written by the client or a broken proxy: stop at the last
            // address we could trust.
            return client;
        };
        client = ip;
        if !is_trusted(ip) {
            return ip;
        }
    }
    client
}

/// An X-Forwarded-For entry: an address, possibly with a port
/// (`1.2.3.4:5678`, `[::1]:80`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parses_networks() {
        let n = Network::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.0.0.1")));
        let one = Network::parse("127.0.0.1").unwrap();
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let v6 = Network::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert!(Network::parse("10.0.0.0/33").is_none());
        assert!(Network::parse("10.0.0.0/x").is_none());
        assert!(Network::parse("proxy").is_none());
        let odd = Network::parse("192.168.0.0/17").unwrap();
        assert!(odd.contains(ip("192.168.127.1")));
        assert!(!odd.contains(ip("192.168.128.1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = [Network::parse("10.0.0.0/8").unwrap()];
        let peer = ip("10.0.0.5");
        let outsider = ip("203.0.113.9");
        // An untrusted peer's header is ignored.
        assert_eq!(client_ip(outsider, &xff(&["1.1.1.1"]), &trusted), outsider);
        // The right-most untrusted entry wins; forged entries to its left lose.
        assert_eq!(client_ip(peer, &xff(&["1.1.1.1"]), &trusted), ip("1.1.1.1"));
        assert_eq!(
            client_ip(peer, &xff(&["6.6.6.6, 1.1.1.1"]), &trusted),
            ip("1.1.1.1")
        );
        assert_eq!(
            client_ip(peer, &xff(&["6.6.6.6, 1.1.1.1, 10.0.0.7"]), &trusted),
            ip("1.1.1.1")
        );
        assert_eq!(
            client_ip(peer, &xff(&["6.6.6.6", "1.1.1.1"]), &trusted),
            ip("1.1.1.1")
        );
        // Only proxies: the left-most. No header: the peer.
        assert_eq!(
            client_ip(peer, &xff(&["10.0.0.1, 10.0.0.2"]), &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), &trusted), peer);
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client_ip(peer, &xff(&["1.1.1.1, garbage"]), &trusted), peer);
        assert_eq!(
            client_ip(peer, &xff(&["garbage, 10.0.0.9"]), &trusted),
            ip("10.0.0.9")
        );
        // Ports and mapped addresses.
        assert_eq!(
            client_ip(peer, &xff(&["1.1.1.1:555"]), &trusted),
            ip("1.1.1.1")
        );
        assert_eq!(
            client_ip(peer, &xff(&["[2001:db8::1]:80"]), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.5"), &xff(&["::ffff:1.1.1.1"]), &trusted),
            ip("1.1.1.1")
        );
        // Nothing trusted: always the peer.
        assert_eq!(client_ip(peer, &xff(&["1.1.1.1"]), &[]), peer);
    }
}
