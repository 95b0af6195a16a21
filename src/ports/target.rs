//! Which addresses a forward may reach: loopback always, anything else only when
//! `--forward-allow` lists it (a CIDR, an IP, or an ip:port).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::proto::ErrorCode;

/// One `--forward-allow` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// A network: every port of every address in it.
    Net { addr: IpAddr, prefix: u8 },
    /// Exactly this address and port.
    Exact(SocketAddr),
}

/// The parsed `--forward-allow` list (default: empty, loopback only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<Entry>);

/// Parses `--forward-allow`: comma-separated CIDRs (`10.0.0.0/8`, `fd00::/8`), IPs
/// (`10.1.2.3`) or ip:port (`10.1.2.3:5432`, `[fd00::1]:80`); empty means none.
pub fn parse_allow(s: &str) -> Result<AllowList, String> {
    let mut out = Vec::new();
    for raw in s.split(',') {
        let e = raw.trim();
        if e.is_empty() {
            continue;
        }
        out.push(parse_entry(e)?);
    }
    Ok(AllowList(out))
}

fn parse_entry(e: &str) -> Result<Entry, String> {
    let bad = |why: &str| {
        format!("--forward-allow entry '{e}' {why}: use a CIDR (10.0.0.0/8), an IP (10.1.2.3) or ip:port (10.1.2.3:5432, [fd00::1]:80), comma-separated")
    };
    if let Ok(sa) = e.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(bad("has port 0"));
        }
        return Ok(Entry::Exact(SocketAddr::new(
            sa.ip().to_canonical(),
            sa.port(),
        )));
    }
    let (ip, prefix) = match e.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (e, None),
    };
    let addr: IpAddr = ip.parse().map_err(|_| bad("is not an address"))?;
    let addr = addr.to_canonical();
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| bad(&format!("has a prefix length outside 0..={max}")))?,
    };
    Ok(Entry::Net { addr, prefix })
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl AllowList {
    fn allows(&self, sa: SocketAddr) -> bool {
        self.0.iter().any(|e| match *e {
            Entry::Exact(x) => x == sa,
            Entry::Net { addr, prefix } => in_net(sa.ip(), addr, prefix),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why an `OpenForward` names no address the supervisor may connect to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("port {0} is not a TCP port: give 1..=65535")]
    Port(u32),
    #[error("host '{0}' is not an IP address: give an IP literal such as 127.0.0.1 or ::1 (empty means 127.0.0.1); names are not resolved")]
    Host(String),
    #[error("{0} is not a loopback address and not in --forward-allow: forwards reach loopback only unless the supervisor's --forward-allow lists the address (a CIDR, IP or ip:port)")]
    NotAllowed(SocketAddr),
}

impl TargetError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TargetError::Port(_) | TargetError::Host(_) => ErrorCode::InvalidArgument,
            TargetError::NotAllowed(_) => ErrorCode::PermissionDenied,
        }
    }
}

/// The address `host:port` of an `OpenForward` names, if it may be reached.
pub fn resolve(host: &str, port: u32, allow: &AllowList) -> Result<SocketAddr, TargetError> {
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(TargetError::Port(port))?;
    let h = host.trim();
    let ip: IpAddr = match h {
        "" | "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| TargetError::Host(host.to_owned()))?
            .to_canonical(),
    };
    let sa = SocketAddr::new(ip, port);
    if ip.is_loopback() || allow.allows(sa) {
        Ok(sa)
    } else {
        Err(TargetError::NotAllowed(sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_always_the_rest_only_when_listed() {
        let none = AllowList::default();
        assert_eq!(
            resolve("", 8000, &none).unwrap().to_string(),
            "127.0.0.1:8000"
        );
        assert_eq!(
            resolve("127.3.4.5", 1, &none).unwrap().to_string(),
            "127.3.4.5:1"
        );
        assert_eq!(resolve("::1", 22, &none).unwrap().to_string(), "[::1]:22");
        assert_eq!(resolve("[::1]", 22, &none).unwrap().to_string(), "[::1]:22");
        assert_eq!(
            resolve("::ffff:127.0.0.1", 22, &none).unwrap().to_string(),
            "127.0.0.1:22"
        );
        for bad in ["10.1.2.3", "0.0.0.0", "::", "192.168.1.1"] {
            let e = resolve(bad, 80, &none).unwrap_err();
            assert_eq!(e.code(), ErrorCode::PermissionDenied, "{bad}");
            assert!(e.to_string().contains("--forward-allow"), "{e}");
        }
        let allow = parse_allow("10.0.0.0/8, 192.168.1.7:5432,fd00::/8").unwrap();
        assert!(resolve("10.200.0.1", 80, &allow).is_ok());
        assert!(resolve("11.0.0.1", 80, &allow).is_err());
        assert!(resolve("192.168.1.7", 5432, &allow).is_ok());
        assert!(resolve("192.168.1.7", 5433, &allow).is_err());
        assert!(resolve("fd12::1", 80, &allow).is_ok());
        assert!(resolve("fe80::1", 80, &allow).is_err());
        let all = parse_allow("0.0.0.0/0").unwrap();
        assert!(resolve("8.8.8.8", 53, &all).is_ok());
    }

    #[test]
    fn bad_ports_hosts_and_entries_are_named() {
        let none = AllowList::default();
        for p in [0, 65536, u32::MAX] {
            let e = resolve("", p, &none).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidArgument);
            assert!(e.to_string().contains(&p.to_string()));
        }
        let e = resolve("example.com", 80, &none).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert!(e.to_string().contains("example.com"));
        for bad in ["10.0.0.0/33", "nope", "1.2.3.4:0", "::/129"] {
            let e = parse_allow(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("--forward-allow"), "{e}");
        }
        assert!(parse_allow("").unwrap().is_empty());
    }
}
