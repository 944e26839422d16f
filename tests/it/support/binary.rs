//! The `keyrelay` binary as users run it, started in a directory of files.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// `keyrelay` in `dir`, with a clean environment.
pub fn keyrelay(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrelay"));
    cmd.current_dir(dir)
        .env_clear()
        .env("RUST_LOG", "keyrelay=info");
    cmd
}

/// Runs `keyrelay check` in `dir`: whether it passed, and what it printed (stdout, then stderr).
pub fn check(dir: &Path) -> (bool, String) {
    let out = keyrelay(dir).arg("check").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Writes `text` to `dir/name`, creating directories.
pub fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A directory the binary can serve `mock` from: `config` as its config.yaml, provider `mock` with one key, and
/// the proxy key.
pub fn mock_dir(mock: &super::Mock, config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", config);
    write(
        dir.path(),
        "providers/mock.yaml",
        &super::provider_yaml(&mock.base_url, ""),
    );
    let env = format!(
        "PROXY_API_KEY={}\nMOCK_API_KEY_1={}\n",
        super::PROXY_KEY,
        super::key(1)
    );
    write(dir.path(), ".env", &env);
    dir
}

/// A running `keyrelay serve`, killed when dropped.
pub struct Served {
    pub child: Child,
    pub url: String,
    /// Every line it wrote to stdout but its banner.
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Served {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A one-line chat request for `model`, with the proxy key, ready to send.
    pub fn chat(&self, model: &str) -> reqwest::RequestBuilder {
        use super::JsonBody;
        super::http_client()
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(super::PROXY_KEY)
            .json_body(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
    }

    /// `GET path` with the proxy key; the answer's text.
    pub async fn get_text(&self, path: &str) -> String {
        super::http_client()
            .get(format!("{}{path}", self.url))
            .bearer_auth(super::PROXY_KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET path` with the proxy key; the answer as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let text = self.get_text(path).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {text}"))
    }

    /// What it logged so far, one line per entry.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The log once a line `matches` (lines are written in batches); panics naming `what` when none does.
    pub async fn log_once(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        super::eventually_some(&format!("a log line showing {what}"), || async {
            let log = self.log().join("\n");
            log.lines().any(&matches).then_some(log)
        })
        .await
    }

    /// Waits for the process to exit (after `terminate`).
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `keyrelay --port 0` in `dir` with these environment variables; with `max_files`, under that open-file
/// limit (soft, hard).
pub fn start(dir: &Path, env: &[(&str, &str)], max_files: Option<(u32, u32)>) -> Served {
    let bin = env!("CARGO_BIN_EXE_keyrelay");
    let mut cmd = match max_files {
        Some((soft, hard)) => {
            let mut sh = Command::new("sh");
            let script = format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" --port 0");
            sh.args(["-c", &script, bin]);
            sh.current_dir(dir)
                .env_clear()
                .env("RUST_LOG", "keyrelay=info");
            sh
        }
        None => {
            let mut cmd = keyrelay(dir);
            cmd.args(["--port", "0"]);
            cmd
        }
    };
    let mut child = cmd
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    // Start-up may log (a leftover file removed, a warning) before the banner; those lines are part of the log.
    let mut before = Vec::new();
    let url = loop {
        let Some(Ok(line)) = stdout.next() else {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            panic!("keyrelay did not start: {before:?} {stderr}");
        };
        match line.split_once("listening on ") {
            Some((_, address)) => break address.to_string(),
            None => before.push(line),
        }
    };
    let lines = Arc::new(Mutex::new(before));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in stdout.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Served { child, url, lines }
}

/// Starts `keyrelay` on port 0 in `dir` and returns the child with its base URL (read from its banner).
pub fn serve(dir: &Path) -> (Child, String) {
    serve_with(dir, &[])
}

/// `serve` with these environment variables set.
pub fn serve_with(dir: &Path, env: &[(&str, &str)]) -> (Child, String) {
    let mut served = start(dir, env, None);
    let child = std::mem::replace(&mut served.child, Command::new("true").spawn().unwrap());
    (child, served.url.clone())
}

/// Sends SIGTERM.
pub fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
