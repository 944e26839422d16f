//! Bounds on client connections (`server:` in `config.yaml`), and the open-file limit the connection cap has to
//! fit in.

use std::time::Duration;

/// File descriptors kept for everything but client connections (files, the watcher, the trust store) when the cap
/// is derived or checked.
const RESERVED_FDS: u64 = 64;

/// The cap's bounds when it is derived from the open-file limit.
const DERIVED: std::ops::RangeInclusive<u64> = 16..=100_000;

/// Bounds on client connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Open client connections; `None` (`auto`): derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    /// From a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// Reading a request body.
    pub body_timeout: Duration,
    /// A keep-alive connection waiting for its next request.
    pub idle_timeout: Duration,
    /// An answer the client does not read: no byte of it taken for this long.
    pub write_timeout: Duration,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_connections: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// The number of client connections served at once, and why it is lower than `server.max_connections` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionCap {
    pub cap: usize,
    /// Set when `max_connections` asks for more than the open-file limit allows: says so, with the cap used.
    pub lowered: Option<String>,
}

impl EdgeLimits {
    /// The cap under an open-file limit of `open_files` (`None`: unknown, taken as 1,024). Each client
    /// connection may need a descriptor for its upstream too, and [`RESERVED_FDS`] are kept for the rest, so at
    /// most half of what is left after those is used: `auto` is that much (within 16 and 100,000), and a
    /// configured `max_connections` above it is lowered to it.
    pub fn connection_cap(&self, open_files: Option<u64>) -> ConnectionCap {
        let files = open_files.unwrap_or(1024);
        let fits = files.saturating_sub(RESERVED_FDS) / 2;
        let derived = fits.clamp(*DERIVED.start(), *DERIVED.end()) as usize;
        match self.max_connections {
            None => ConnectionCap {
                cap: derived,
                lowered: None,
            },
            Some(asked) if (asked as u64) <= fits.max(*DERIVED.start()) => ConnectionCap {
                cap: asked,
                lowered: None,
            },
            Some(asked) => ConnectionCap {
                cap: derived,
                lowered: Some(format!(
                    "server.max_connections is {asked}, more than the open-file limit of {files} allows (a connection \
                     may need a second file for its upstream, and {RESERVED_FDS} are kept for the rest): serving at \
                     most {derived} connections; raise the limit (ulimit -n, LimitNOFILE) or lower max_connections"
                )),
            },
        }
    }
}

/// The open-file limit, raised to its hard limit (once per process, at the first call); `None` where it cannot
/// be read.
pub fn raise_open_file_limit() -> Option<u64> {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        #[cfg(unix)]
        {
            use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
            let current = getrlimit(Resource::Nofile);
            let raised = Rlimit {
                current: current.maximum,
                maximum: current.maximum,
            };
            let limit = match setrlimit(Resource::Nofile, raised) {
                Ok(()) => raised.current,
                Err(_) => current.current,
            };
            Some(limit.unwrap_or(u64::MAX))
        }
        #[cfg(not(unix))]
        {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(max: Option<usize>, files: u64) -> ConnectionCap {
        EdgeLimits {
            max_connections: max,
            ..Default::default()
        }
        .connection_cap(Some(files))
    }

    #[test]
    fn the_cap_fits_in_the_open_file_limit() {
        assert_eq!(cap(None, 1024).cap, 480);
        assert_eq!(cap(None, 80).cap, 16, "never fewer than 16 when derived");
        assert_eq!(cap(None, u64::MAX).cap, 100_000);
        assert_eq!(cap(Some(480), 1024), cap(None, 1024));
        assert_eq!(cap(Some(8), 1024).cap, 8);
        let lowered = cap(Some(5000), 1024);
        assert_eq!(lowered.cap, 480);
        let why = lowered.lowered.unwrap();
        assert!(why.contains("is 5000") && why.contains("1024") && why.contains("at most 480"));
        assert!(!why.contains('\n'), "one line");
        assert!(cap(Some(16), 64).lowered.is_none(), "16 is always allowed");
    }
}
