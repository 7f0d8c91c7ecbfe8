//! A cluster DNS for the pod tests: a real DNS server (dnsmasq) answering the names a test gives
//! it, on port 53 of a loopback address of its own (a resolv.conf names a server by address
//! only, so the port must be 53). A pod reaches it as a cluster's pods reach CoreDNS: through the
//! `nameserver` line the runtime writes into the container's /etc/resolv.conf.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Dns {
    child: Child,
    /// The address the server listens on (port 53).
    pub address: Ipv4Addr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dns {
    /// Starts dnsmasq answering each `(name, address)` with an A record, and nothing else
    /// (other names are refused: no upstream, no /etc/hosts). Needs root, for port 53.
    pub fn start(records: &[(&str, Ipv4Addr)]) -> Result<Dns> {
        // An address of 127.53.0.0/16 of its own, so that test binaries run side by side do not meet.
        let pid = std::process::id();
        let address = Ipv4Addr::new(127, 53, (pid >> 8) as u8, (pid as u8).max(1));
        Dns::start_at(address, records)
    }

    /// Like [`Dns::start`], on port 53 of `address`, an address of this machine (for pods of the
    /// test cluster: the machine's address they reach, [`crate::cluster::HOST_IP`]).
    pub fn start_at(address: Ipv4Addr, records: &[(&str, Ipv4Addr)]) -> Result<Dns> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("dnsmasq.log");
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .context("dnsmasq is not installed (scripts/stack-install.sh installs it)")?;
        let mut cmd = Command::new(binary);
        cmd.args(["--keep-in-foreground", "--port=53", "--bind-interfaces"])
            .arg(format!("--listen-address={address}"))
            .args(["--no-resolv", "--no-hosts", "--log-queries"])
            .arg(format!("--log-facility={}", log.display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg("--user=root");
        for (name, ip) in records {
            cmd.arg(format!("--address=/{name}/{ip}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq")?;
        let mut dns = Dns {
            child,
            address,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let name = records.first().map(|r| r.0).unwrap_or("ready.test");
        while !dns.answers(name) {
            if let Some(status) = dns.child.try_wait()? {
                bail!("dnsmasq exited ({status}): {}", dns.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "dnsmasq at {address} did not answer within 10 s: {}",
                    dns.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(dns)
    }

    /// Whether the server answers a query for `name` (an A query built by hand).
    fn answers(&self, name: &str) -> bool {
        let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
            return false;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
        let mut query = vec![0x5e, 0x1d, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        if socket.send_to(&query, (self.address, 53)).is_err() {
            return false;
        }
        let mut answer = [0u8; 512];
        matches!(socket.recv(&mut answer), Ok(n) if n >= 12 && answer[..2] == query[..2])
    }

    /// The names the server was asked for, in order (its query log).
    pub fn queries(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| {
                let rest = line.split_once("query[")?.1;
                let (_, after) = rest.split_once("] ")?;
                Some(after.split_whitespace().next()?.to_string())
            })
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
