//! A real `redis-server` for the shared store tests: over TCP, TLS (a certificate made for the test) or a unix
//! socket.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

// benches/load/stores.rs includes this file on its own: the polling helper (`support::wait`) comes with it.
#[path = "wait.rs"]
pub mod wait;
use wait::eventually_blocking;

/// How clients reach the server.
enum Listen {
    Tcp,
    /// TLS on the port, with this CA certificate (PEM) to trust.
    Tls(PathBuf),
    Unix(PathBuf),
}

/// A `redis-server` on a free loopback port, without persistence, stopped when dropped.
pub struct Redis {
    child: Child,
    pub port: u16,
    listen: Listen,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        Self::spawn(port, Listen::Tcp, tempfile::tempdir().unwrap(), &[])
    }

    /// TLS only, with a certificate for `localhost` that the system does not trust: clients need
    /// [`Redis::ca_file`].
    pub fn start_tls() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key, ca) = (
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
            dir.path().join("ca.pem"),
        );
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&ca, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let port = free_port();
        let args = [
            "--port".to_string(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            cert.display().to_string(),
            "--tls-key-file".into(),
            key.display().to_string(),
            "--tls-ca-cert-file".into(),
            ca.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        Self::spawn(port, Listen::Tls(ca), dir, &args)
    }

    /// A unix socket only.
    pub fn start_unix() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("redis.sock");
        let args = [
            "--port".to_string(),
            "0".into(),
            "--unixsocket".into(),
            socket.display().to_string(),
        ];
        Self::spawn(0, Listen::Unix(socket), dir, &args)
    }

    fn spawn(port: u16, listen: Listen, dir: tempfile::TempDir, args: &[String]) -> Self {
        let mut command = Command::new("redis-server");
        if let Listen::Tcp = listen {
            command.args(["--port", &port.to_string()]);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--enable-debug-command", "yes"])
            .args(args)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("this test needs redis-server: run .ci/run (which installs it), or apt-get install redis-server");
        eventually_blocking("redis-server to listen", || {
            let up = match &listen {
                Listen::Unix(socket) => socket.exists(),
                _ => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            };
            up.then_some(())
        });
        Self {
            child,
            port,
            listen,
            dir,
        }
    }

    pub fn url(&self) -> String {
        match &self.listen {
            Listen::Tcp => format!("redis://127.0.0.1:{}", self.port),
            Listen::Tls(_) => format!("rediss://localhost:{}", self.port),
            Listen::Unix(socket) => format!("unix://{}", socket.display()),
        }
    }

    /// The CA certificate a TLS server's clients trust.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        match &self.listen {
            Listen::Tls(ca) => Some(ca),
            _ => None,
        }
    }

    /// What Redis counted of the commands it served, by name (`INFO commandstats`): calls, and microseconds
    /// spent in them. A script counts once as `evalsha` (or `eval`); the commands it runs count under their
    /// own names.
    pub async fn command_stats(&self) -> std::collections::HashMap<String, (u64, u64)> {
        let client = ::redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        let field = |rest: &str, name: &str| -> Option<u64> {
            rest.split(',')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        info.lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                Some((
                    name.to_string(),
                    (field(rest, "calls")?, field(rest, "usec")?),
                ))
            })
            .collect()
    }

    /// The server's working directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of `nodes` primaries on loopback (no replicas), made with `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start(nodes: usize) -> Self {
        let nodes: Vec<Redis> = (0..nodes)
            .map(|_| {
                let args = [
                    "--cluster-enabled".to_string(),
                    "yes".into(),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                ];
                Redis::spawn(
                    free_port(),
                    Listen::Tcp,
                    tempfile::tempdir().unwrap(),
                    &args,
                )
            })
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("this test needs redis-cli (redis-tools, installed with redis-server)");
        assert!(created.success(), "redis-cli --cluster create failed");
        // Ready when every node says so.
        for node in &nodes {
            eventually_blocking("the cluster to be ready", || {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&info.stdout)
                    .contains("cluster_state:ok")
                    .then_some(())
            });
        }
        Self { nodes }
    }

    /// A node to start from (the client discovers the others).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| {
                let out = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "dbsize"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
            .collect()
    }
}
