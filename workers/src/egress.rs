//! The egress proxy's policy (issue 15): a sandbox run that may install dependencies sits on
//! an internal Docker network whose only way out is a forward proxy (squid, from Debian's
//! packages, image `deploy/egress-proxy-image.sh`). This module writes the proxy's
//! configuration from an [`EgressPolicy`]:
//!
//! - only the listed registry hosts are reachable (by name: a request for an IP literal or
//!   any other name is refused);
//! - private, loopback, link-local (the metadata address `169.254.169.254` included),
//!   carrier-grade NAT, multicast and reserved ranges are refused after DNS resolution, so a
//!   registry name that resolves (or is rebound) to `10.x` or `169.254.169.254` is refused
//!   too; only the CIDRs the operator lists for in-house mirrors are exempt;
//! - only the listed ports, and CONNECT only to 443;
//! - every request is logged (to the proxy's stdout), nothing is cached.
//!
//! Everything that goes into the file is checked first: a host or CIDR that could add a
//! line (a newline, a space, a `#`) is refused, since the file is the policy.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Ranges refused after resolution unless [`EgressPolicy::private_mirrors`] lists them.
pub const REFUSED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// What the egress proxy lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Registry host names (`pypi.org`, `files.pythonhosted.org`, `registry.npmjs.org`).
    pub registries: Vec<String>,
    /// CIDRs of in-house mirrors that may be reached although they are private
    /// (`10.20.0.0/24`); empty by default.
    pub private_mirrors: Vec<String>,
    /// Ports plain HTTP may use besides 80 (a mirror on 8080); CONNECT is 443 only.
    pub extra_ports: Vec<u16>,
    /// The port the proxy listens on.
    pub listen_port: u16,
}

/// A policy value that cannot go into the configuration; says which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress policy: {0}")]
pub struct PolicyError(String);

impl EgressPolicy {
    /// The squid configuration for this policy, or why the policy is unusable.
    pub fn squid_conf(&self) -> Result<String, PolicyError> {
        if self.registries.is_empty() {
            return Err(PolicyError(
                "no registry host is listed: with none, nothing could be installed; list e.g. pypi.org".into(),
            ));
        }
        for host in &self.registries {
            check_host(host)?;
        }
        for cidr in &self.private_mirrors {
            check_cidr(cidr)?;
        }
        let mut out =
            String::from("# Written by agentfleet (workers::egress): the sandbox's only way out. Do not edit.\n");
        let _ = writeln!(out, "http_port {}", self.listen_port);
        let _ = writeln!(out, "acl registries dstdomain {}", self.registries.join(" "));
        let _ = writeln!(out, "acl refused_ranges dst {}", REFUSED_RANGES.join(" "));
        if !self.private_mirrors.is_empty() {
            let _ = writeln!(out, "acl mirrors dst {}", self.private_mirrors.join(" "));
        }
        let mut ports = vec![80u16, 443];
        ports.extend(&self.extra_ports);
        ports.sort_unstable();
        ports.dedup();
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let _ = writeln!(out, "acl safe_ports port {}", ports.join(" "));
        out.push_str(
            "acl tls_port port 443\n\
             acl CONNECT method CONNECT\n\
             http_access deny !safe_ports\n\
             http_access deny CONNECT !tls_port\n\
             http_access deny !registries\n",
        );
        if !self.private_mirrors.is_empty() {
            out.push_str("http_access allow mirrors\n");
        }
        out.push_str(
            "http_access deny refused_ranges\n\
             http_access allow registries\n\
             http_access deny all\n\
             http_reply_access allow all\n\
             cache deny all\n\
             via off\n\
             forwarded_for delete\n\
             pid_filename none\n\
             logfile_rotate 0\n\
             access_log stdio:/dev/stdout squid\n\
             cache_log stdio:/dev/stderr\n\
             shutdown_lifetime 1 seconds\n",
        );
        Ok(out)
    }
}

/// A DNS name: letters, digits, `-` and `.`, labels of 1–63, at most 253, not an IP
/// literal (registries are allowed by name).
fn check_host(host: &str) -> Result<(), PolicyError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && host.parse::<IpAddr>().is_err();
    if ok {
        Ok(())
    } else {
        Err(PolicyError(format!(
            "registry {:?} is not a host name (letters, digits, '-' and '.'; no IP address, port or path)",
            host.chars().take(80).collect::<String>()
        )))
    }
}

/// `ADDRESS/PREFIX` with a prefix that fits the address.
fn check_cidr(cidr: &str) -> Result<(), PolicyError> {
    let bad = || {
        PolicyError(format!(
            "private mirror {:?} is not a CIDR such as 10.20.0.0/24",
            cidr.chars().take(80).collect::<String>()
        ))
    };
    let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max || prefix < 8 {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EgressPolicy {
        EgressPolicy {
            registries: vec!["pypi.org".into(), "files.pythonhosted.org".into()],
            private_mirrors: vec![],
            extra_ports: vec![],
            listen_port: 3128,
        }
    }

    #[test]
    fn the_file_allows_only_registries_and_refuses_private_ranges_after_resolution() {
        let conf = policy().squid_conf().unwrap();
        assert!(conf.contains("acl registries dstdomain pypi.org files.pythonhosted.org\n"));
        assert!(conf.contains("169.254.0.0/16") && conf.contains("10.0.0.0/8"));
        // Order is the policy: name first, then the resolved address, then allow.
        let deny_name = conf.find("http_access deny !registries").unwrap();
        let deny_range = conf.find("http_access deny refused_ranges").unwrap();
        let allow = conf.find("http_access allow registries").unwrap();
        assert!(deny_name < deny_range && deny_range < allow, "{conf}");
        assert!(conf.ends_with("shutdown_lifetime 1 seconds\n"));
        assert!(!conf.contains("mirrors"));
        let mut with_mirror = policy();
        with_mirror.private_mirrors = vec!["10.20.0.0/24".into()];
        with_mirror.extra_ports = vec![8080];
        let conf = with_mirror.squid_conf().unwrap();
        assert!(
            conf.find("http_access allow mirrors").unwrap() < conf.find("http_access deny refused_ranges").unwrap()
        );
        assert!(conf.contains("acl safe_ports port 80 443 8080\n"));
    }

    #[test]
    fn nothing_that_could_add_a_line_gets_into_the_file() {
        for host in [
            "pypi.org\nhttp_access allow all",
            "pypi.org all",
            "#x",
            "169.254.169.254",
            "::1",
            "pypi.org:443",
            "pypi.org/simple",
            "",
            "-bad.org",
        ] {
            let mut p = policy();
            p.registries.push(host.into());
            let err = p.squid_conf().unwrap_err().to_string();
            assert!(err.contains("is not a host name"), "{host:?}: {err}");
        }
        for cidr in ["10.0.0.0/24\nhttp_access allow all", "10.0.0.0", "10.0.0.0/33", "0.0.0.0/0", "all"] {
            let mut p = policy();
            p.private_mirrors.push(cidr.into());
            assert!(p.squid_conf().unwrap_err().to_string().contains("is not a CIDR"), "{cidr:?}");
        }
        let mut none = policy();
        none.registries.clear();
        assert!(none.squid_conf().unwrap_err().to_string().contains("no registry host is listed"));
    }
}
