//! Where the shared state lives: one Redis server (TCP, TLS or a unix socket) or a Redis Cluster, and a
//! connection to either that the store uses the same way. Every script touches the keys of one provider only,
//! all in one hash slot, so a Cluster runs each on the node that owns its provider.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::time::Duration;

/// The Redis to share key state through.
pub struct Target {
    /// The server; with a Cluster, its first node, where wakeups are heard (a Cluster passes every published
    /// message on to all its nodes).
    server: redis::Client,
    cluster: Option<Box<redis::cluster::ClusterClient>>,
}

impl Target {
    /// The Redis at `url` (`redis://`, `rediss://`, `unix://`), or the Cluster `url` is a node of. A
    /// `rediss://` server's certificate is checked against `ca` (PEM) when given, else against the system's
    /// authorities.
    pub fn new(url: &str, ca: Option<&[u8]>, cluster: bool) -> RedisResult<Self> {
        // The scripts' replies are read as RESP2 gives them (a Lua false is a nil there, a boolean in RESP3).
        if url.contains("protocol=resp3") {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "keyrelay speaks RESP2 to Redis: leave protocol=resp3 out of the URL",
            )));
        }
        let certificates = || redis::TlsCertificates {
            client_tls: None,
            root_cert: ca.map(<[u8]>::to_vec),
        };
        let server = match ca {
            None => redis::Client::open(url)?,
            Some(_) => redis::Client::build_with_tls(url, certificates())?,
        };
        let cluster = match cluster {
            false => None,
            true => {
                let mut builder = redis::cluster::ClusterClient::builder([url]);
                if ca.is_some() {
                    builder = builder.certs(certificates());
                }
                Some(Box::new(builder.build()?))
            }
        };
        Ok(Self { server, cluster })
    }

    /// A connection that reconnects by itself; every operation gives up after `timeout`.
    pub(super) async fn connect(&self, timeout: Duration) -> RedisResult<Conn> {
        match &self.cluster {
            None => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout));
                let conn = ConnectionManager::new_with_config(self.server.clone(), config).await?;
                Ok(Conn::Single(conn))
            }
            Some(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                let conn = client.get_async_connection_with_config(config).await?;
                Ok(Conn::Cluster(conn))
            }
        }
    }

    pub(super) fn subscriber(&self) -> &redis::Client {
        &self.server
    }
}

/// A connection to one server or to a Cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
