//! The command line: `keyrelay [serve]` and `keyrelay check`.

use crate::snapshot::{LoadOptions, Snapshot};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "keyrelay",
    version,
    about = "An OpenAI-compatible proxy that pools and rotates provider API keys"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the proxy (the default).
    Serve(ServeArgs),
    /// Load and validate the configuration exactly as `serve` would, print a summary, and exit.
    Check(FileArgs),
    /// Run keyrelay in front of a built-in fake provider (no real key needed) to see rotation at work.
    Demo(DemoArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

#[derive(Debug, Clone, Args)]
pub struct FileArgs {
    /// The settings file; a missing default file means all defaults.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The env file with provider keys; a missing file is fine.
    #[arg(long, value_name = "PATH", default_value = ".env")]
    pub env_file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Address to listen on [default: 127.0.0.1, or `host` in config.yaml].
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on [default: 8000, or `port` in config.yaml].
    #[arg(long)]
    pub port: Option<u16>,
    /// Write every request and response (secrets redacted) to a file under logs/.
    #[arg(long)]
    pub enable_request_logging: bool,
    /// Console log format: `text`, or `json` for log shippers. The level comes from RUST_LOG.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl FileArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            config_required: self.config.is_some(),
            config: self.config.clone().unwrap_or_else(|| "config.yaml".into()),
            env_file: self.env_file.clone(),
            host: None,
            port: None,
            request_logging: false,
        }
    }
}

impl ServeArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            host: self.host.clone(),
            port: self.port,
            request_logging: self.enable_request_logging,
            ..self.files.load_options()
        }
    }
}

/// The summary `keyrelay check` prints for a valid configuration.
pub fn summary(snapshot: &Snapshot, opts: &LoadOptions) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = &snapshot.settings;
    let config = if opts.config.exists() {
        opts.config.display().to_string()
    } else {
        "none (all defaults)".into()
    };
    let _ = writeln!(out, "configuration is valid");
    let _ = writeln!(out, "  config:    {config}");
    let _ = writeln!(out, "  providers: {}", s.providers_dir.display());
    let _ = writeln!(out, "  listen:    {}:{}", s.host, s.port);
    let _ = writeln!(
        out,
        "  proxy key: {}",
        if snapshot.proxy_key.is_some() {
            "set"
        } else {
            "not set (loopback only)"
        }
    );
    let _ = writeln!(out, "providers:");
    for p in snapshot.providers.values() {
        let keys: Vec<&str> = p.keys.iter().map(|k| &*k.masked).collect();
        let models = match p.list {
            crate::provider::ListSource::Static => {
                format!("{} static models", p.static_models.len())
            }
            crate::provider::ListSource::Upstream => "models listed by the upstream".into(),
            crate::provider::ListSource::Both => {
                format!("{} static models + upstream list", p.static_models.len())
            }
        };
        let mut filters = String::new();
        if !p.filter.allow.is_empty() {
            let _ = write!(filters, "; allow {}", p.filter.allow.join(","));
        }
        if !p.filter.deny.is_empty() {
            let _ = write!(filters, "; deny {}", p.filter.deny.join(","));
        }
        let keys = match keys.len() {
            0 => "no keys".to_string(),
            1 => format!("1 key ({})", keys[0]),
            n => format!("{n} keys ({})", keys.join(" ")),
        };
        let selection = match p.tuning.selection {
            crate::config::Selection::Balanced => "balanced",
            crate::config::Selection::Sequential => "sequential",
        };
        let prices = match (p.prices.len(), &p.prices.taken) {
            (0, _) => String::new(),
            (n, Some(taken)) => format!("; prices for {n} models (taken {taken})"),
            (n, None) => format!("; prices for {n} models"),
        };
        let _ = writeln!(
            out,
            "  {:<12} {keys}; {models}{filters}; {selection} selection{prices}",
            p.name
        );
    }
    let honoured: Vec<_> = snapshot.legacy.iter().filter(|r| r.honoured).collect();
    if !honoured.is_empty() {
        let _ = writeln!(out, "from the Python proxy's variables:");
        for r in honoured {
            let _ = writeln!(out, "  {:<44} -> {}", r.variable, r.effect);
        }
    }
    for w in &snapshot.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
