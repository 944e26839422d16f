//! The `keyrelay` binary: parse the command line, then serve or check.

use clap::Parser;
use keyrelay::cli::{Cli, Command, ServeArgs, summary};
use keyrelay::clock::Clock;
use keyrelay::snapshot::Snapshot;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyrelay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Check(files)) => check(&files),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        Some(Command::Demo(args)) => runtime.block_on(demo(args)),
        None => runtime.block_on(serve(cli.serve)),
    }
}

fn check(files: &keyrelay::cli::FileArgs) -> ExitCode {
    let opts = files.load_options();
    match Snapshot::load(&opts) {
        Ok(snapshot) => {
            print!("{}", summary(&snapshot, &opts));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!(
                "keyrelay check: {} problem{} found",
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let _logs = init_logging(&args.log_format);
    let say = Say {
        json: args.log_format == "json",
    };
    let opts = args.load_options();
    let snapshot = match Snapshot::load(&opts) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors.0 {
                say.error(&format!("keyrelay: {e}"));
            }
            return ExitCode::FAILURE;
        }
    };
    let warnings = snapshot.warnings.clone();
    let request_log_dir = snapshot
        .settings
        .request_logging
        .as_ref()
        .map(|r| r.dir.clone());
    let open = snapshot.proxy_key.is_none();
    let providers: Vec<(String, usize)> = snapshot
        .providers
        .values()
        .map(|p| (p.name.clone(), p.keys.len()))
        .collect();
    let running = match keyrelay::app::start(snapshot, Some(opts), Clock::system()).await {
        Ok(r) => r,
        Err(e) => {
            say.error(&format!("keyrelay: {e}"));
            return ExitCode::FAILURE;
        }
    };
    say.info(&format!(
        "keyrelay {} listening on http://{}",
        env!("CARGO_PKG_VERSION"),
        running.addr
    ));
    let (serving, idle): (Vec<_>, Vec<_>) = providers.iter().partition(|(_, keys)| *keys > 0);
    for (name, keys) in &serving {
        say.info(&format!(
            "  provider {name}: {keys} key{}",
            if *keys == 1 { "" } else { "s" }
        ));
    }
    if serving.is_empty() {
        say.warn("no provider has keys; set <PROVIDER>_API_KEY in .env (see .env.example)");
    }
    if !idle.is_empty() {
        let names: Vec<&str> = idle.iter().map(|(n, _)| n.as_str()).collect();
        say.info(&format!("  providers without keys: {}", names.join(", ")));
    }
    if open {
        say.warn("PROXY_API_KEY is not set: any local process can use this proxy without a key");
    }
    if let Some(dir) = &request_log_dir {
        say.info(&format!(
            "  request logging: one file per request under {}",
            dir.display()
        ));
    }
    for w in &warnings {
        say.warn(w);
    }
    let stopper = running.stopper();
    tokio::spawn(async move {
        keyrelay::app::shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        stopper.cancel();
    });
    match running.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say.error(&format!(
                "keyrelay: the usage file could not be written at shutdown: {e}"
            ));
            ExitCode::FAILURE
        }
    }
}

/// What `serve` prints itself (the banner, start-up failures): text as a person reads it, or, with
/// `--log-format json`, JSON lines shaped like every log line.
struct Say {
    json: bool,
}

impl Say {
    fn line(&self, level: &str, text: &str) -> String {
        if self.json {
            // In the order of the log lines' own fields.
            let quoted = |s: &str| serde_json::Value::from(s).to_string();
            format!(
                "{{\"timestamp\":{},\"level\":{},\"message\":{}}}",
                quoted(&jiff::Timestamp::now().to_string()),
                quoted(level),
                quoted(text.trim_start())
            )
        } else if level == "WARN" {
            format!("warning: {text}")
        } else {
            text.to_string()
        }
    }

    fn info(&self, text: &str) {
        println!("{}", self.line("INFO", text));
    }

    fn warn(&self, text: &str) {
        println!("{}", self.line("WARN", text));
    }

    fn error(&self, text: &str) {
        eprintln!("{}", self.line("ERROR", text));
    }
}

async fn demo(args: keyrelay::cli::DemoArgs) -> ExitCode {
    let _logs = init_logging("text");
    let state = std::env::temp_dir().join(format!("keyrelay-demo-{}", std::process::id()));
    let running = match keyrelay::demo::start(&args.host, args.port, &state).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyrelay: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", keyrelay::demo::instructions(&running.addr));
    let stopper = running.stopper();
    tokio::spawn(async move {
        keyrelay::app::shutdown_signal().await;
        stopper.cancel();
    });
    let _ = running.wait().await;
    let _ = std::fs::remove_dir_all(&state);
    ExitCode::SUCCESS
}

/// Logs go to stdout through a background writer thread that writes them in batches, so that a request never
/// waits for a terminal or a pipe. The returned guard flushes what is left when it drops (at exit).
fn init_logging(format: &str) -> keyrelay::observe::log_writer::LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keyrelay=info,warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    use keyrelay::observe::log_writer::{BatchWriter, Format};
    let notices = if format == "json" {
        Format::Json
    } else {
        Format::Text
    };
    let (writer, guard) = BatchWriter::new(std::io::stdout(), notices);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_timer(keyrelay::observe::console::ConsoleTime)
        .with_writer(writer);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder
            .fmt_fields(keyrelay::observe::console::ConsoleFields)
            .init();
    }
    guard
}
