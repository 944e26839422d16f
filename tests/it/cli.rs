//! The `keyrelay` binary as users run it: `check`, start-up failures, the demo, upstream requests through the
//! environment's proxy, and JSON logs. Its life (signals, shutdown, the usage file) is in `lifecycle`.

use crate::support::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

#[test]
fn check_accepts_a_valid_configuration_and_masks_keys() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "providers/acme.yaml",
        "base_url: https://api.acme.test/v1\nmodels: {list: static, static: [a, b]}\n",
    );
    write(
        dir.path(),
        ".env",
        &format!(
            "ACME_API_KEY_1={}\nACME_API_KEY_2={}\nACMEE_API_KEY=typo-key\n",
            key(1),
            key(2)
        ),
    );
    let out = keyrelay(dir.path()).arg("check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "acme         2 keys ({} {}); 2 static models",
            masked(1),
            masked(2)
        )),
        "{stdout}"
    );
    assert!(stdout.contains("warning: ACMEE_API_KEY is set in the env file but no provider of that name is configured"), "{stdout}");
    assert!(
        !stdout.contains(&key(1)) && !stdout.contains("typo-key"),
        "a key leaked: {stdout}"
    );
}

#[test]
fn check_rejects_a_typo_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "config.yaml",
        "request_timeout: 10s\nconcurency:\n  per_key: 2\n",
    );
    write(
        dir.path(),
        "providers/acme.yaml",
        "base_url: https://api.acme.test/v1\nerrors:\n  - status: 429\n    clas: quota\n",
    );
    let out = keyrelay(dir.path())
        .args(["check", "--config", "config.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config.yaml:2: unknown field `concurency`"),
        "{stderr}"
    );
    // The config error stops the load before providers are read; fix it and the provider error shows.
    write(dir.path(), "config.yaml", "request_timeout: 10s\n");
    let out = keyrelay(dir.path()).arg("check").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("providers/acme.yaml:4: errors[0]: unknown field `clas`"),
        "{stderr}"
    );
}

#[test]
fn check_with_an_explicit_missing_config_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyrelay(dir.path())
        .args(["check", "--config", "nowhere.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere.yaml: cannot read"));
}

#[test]
fn serve_refuses_a_taken_port_and_an_open_host_without_a_proxy_key() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = keyrelay(dir.path())
        .args(["--port", &port])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let out = keyrelay(dir.path())
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without PROXY_API_KEY"), "{stderr}");
}

#[tokio::test]
async fn the_demo_serves_chat_and_shows_a_cooling_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = keyrelay(dir.path())
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = lines.next().unwrap().unwrap();
    let url = banner
        .split("listening on ")
        .nth(1)
        .unwrap_or_else(|| panic!("{banner}"))
        .to_string();
    let rest: Vec<String> = lines.by_ref().take(8).map(|l| l.unwrap()).collect();
    assert!(rest.iter().any(|l| l.contains("/dashboard")), "{rest:?}");
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let client = http_client();
    let mut served_by = std::collections::BTreeSet::new();
    for i in 0..8 {
        let body = serde_json::json!({"model": "demo/fast-model", "messages": [{"role": "user", "content": format!("hello {i}")}]});
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .json_body(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "the client never sees the demo's failing keys"
        );
        served_by
            .insert(String::from_utf8_lossy(r.headers()["x-keyrelay-key"].as_bytes()).to_string());
        let text = r.text().await.unwrap();
        assert!(text.contains("fake provider"), "{text}");
    }
    let keys: Value = serde_json::from_str(
        &client
            .get(format!("{url}/v1/keys"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let states: Vec<&str> = keys["data"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"benched"),
        "the dead key is benched: {states:?}"
    );
    assert!(
        served_by.len() >= 2,
        "requests rotate over keys: {served_by:?}"
    );
    terminate(&child);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
}

/// A forward proxy on loopback recording what it is asked (request line and `proxy-authorization`): a plain
/// request for `http://<any host>:<port>/...` is passed on to `127.0.0.1:<port>`; a `CONNECT` is accepted and
/// the first bytes sent into the tunnel are recorded (a TLS client hello starts with 0x16).
fn forward_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://user:pa55@{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let (mut conn, seen) = (conn.unwrap(), record.clone());
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let mut lines = head.lines();
                let request_line = lines.next().unwrap_or("").to_string();
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let auth = header("proxy-authorization");
                seen.lock()
                    .unwrap()
                    .push(format!("{request_line} | {auth}"));
                if request_line.starts_with("CONNECT ") {
                    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .unwrap();
                    let mut first = [0u8; 1024];
                    let n = conn.read(&mut first).unwrap_or(0);
                    let sni = first[..n].windows(13).any(|w| w == b"upstream.test");
                    seen.lock().unwrap().push(format!(
                        "tunnel: tls {} sni {sni}",
                        n > 0 && first[0] == 0x16
                    ));
                    return;
                }
                let mut body = vec![0u8; header("content-length").parse().unwrap_or(0)];
                conn.read_exact(&mut body).unwrap();
                let mut parts = request_line.split(' ');
                let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
                let rest = target.strip_prefix("http://").unwrap();
                let (authority, path) = rest.split_once('/').unwrap();
                let port = authority.rsplit_once(':').unwrap().1;
                let mut upstream = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
                let mut out = format!("{method} /{path} HTTP/1.1\r\nconnection: close\r\n");
                for line in lines.filter(|l| !l.is_empty()) {
                    let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
                    if name != "proxy-authorization" && name != "connection" {
                        out.push_str(line);
                        out.push_str("\r\n");
                    }
                }
                out.push_str("\r\n");
                upstream.write_all(out.as_bytes()).unwrap();
                upstream.write_all(&body).unwrap();
                let mut answer = Vec::new();
                upstream.read_to_end(&mut answer).unwrap();
                conn.write_all(&answer).unwrap();
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn upstream_requests_go_through_the_environments_proxy() {
    let (proxy, seen) = forward_proxy();
    let behind = Mock::echo("via the proxy").await;
    let direct = Mock::echo("direct").await;
    let dir = tempfile::tempdir().unwrap();
    // Hosts the proxy resolves: keyrelay never looks them up itself.
    let port = behind
        .base_url
        .trim_end_matches("/v1")
        .rsplit(':')
        .next()
        .unwrap();
    let behind_url = format!("http://upstream.test:{port}/v1");
    write(
        dir.path(),
        "providers/plain.yaml",
        &provider_yaml(&behind_url, ""),
    );
    write(
        dir.path(),
        "providers/tunneled.yaml",
        &provider_yaml("https://upstream.test/v1", ""),
    );
    write(
        dir.path(),
        "providers/direct.yaml",
        &provider_yaml(&direct.base_url, ""),
    );
    write(dir.path(), "config.yaml", "retries: {attempts: 1}\n");
    write(
        dir.path(),
        ".env",
        &format!(
            "PROXY_API_KEY={PROXY_KEY}\nPLAIN_API_KEY={}\nTUNNELED_API_KEY={}\nDIRECT_API_KEY={}\n",
            key(1),
            key(2),
            key(3)
        ),
    );
    let no_proxy = "localhost,127.0.0.1";
    let (mut child, url) = serve_with(
        dir.path(),
        &[
            ("HTTP_PROXY", &proxy),
            ("HTTPS_PROXY", &proxy),
            ("NO_PROXY", no_proxy),
        ],
    );
    let client = http_client();
    let chat = |model: &str| {
        let body =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(PROXY_KEY)
            .json_body(&body)
    };
    let auth = "Basic dXNlcjpwYTU1"; // user:pa55

    // Plain HTTP: the absolute URL goes to the proxy with its credentials; the answer comes back through it.
    let (status, _, body) = send(chat("plain/m")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "via the proxy");
    assert_eq!(
        seen.lock().unwrap().clone(),
        [format!(
            "POST http://upstream.test:{port}/v1/chat/completions HTTP/1.1 | {auth}"
        )]
    );
    let upstream_saw = behind.chats();
    assert_eq!(upstream_saw.len(), 1);
    assert_eq!(upstream_saw[0].key, key(1));
    assert!(upstream_saw[0].headers.get("proxy-authorization").is_none());

    // HTTPS: a CONNECT tunnel to the upstream's host, then TLS inside it for that host (this proxy ends the
    // tunnel there, so the request fails as a connection error).
    let (status, _, body) = send(chat("tunneled/m")).await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("(connection x1)"), "{message}");
    assert_eq!(
        seen.lock().unwrap()[1..3],
        [
            format!("CONNECT upstream.test:443 HTTP/1.1 | {auth}"),
            "tunnel: tls true sni true".to_string()
        ]
    );

    // NO_PROXY: straight to the upstream.
    let before = seen.lock().unwrap().len();
    let (status, _, body) = send(chat("direct/m")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "direct");
    assert_eq!(seen.lock().unwrap().len(), before, "the proxy saw no more");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn json_logs_make_every_line_json_and_env_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "providers/acme.yaml",
        "base_url: https://api.acme.test/v1\n",
    );
    write(dir.path(), ".env", "ACME_API_KEY_1=abcdefghijklmnop\n");
    let mut child = keyrelay(dir.path())
        .args(["--port", "0", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(lines.next().unwrap().unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for line in &seen {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
    }
    assert!(seen[0].contains("listening on http://"), "{seen:?}");

    write(
        dir.path(),
        ".env",
        "ACME_API_KEY_1=abcdefghijklmnop\n# a comment\nACME_API_KEY_2 two words\n",
    );
    let out = keyrelay(dir.path()).arg("check").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(".env:3: cannot parse"), "{stderr}");
    assert!(
        !stderr.contains("two words"),
        "the line's value is not quoted: {stderr}"
    );
}
