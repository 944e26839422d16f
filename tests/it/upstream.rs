//! The upstream client as users meet it, through the binary (its trust store and proxies come from the process
//! environment): HTTPS upstreams verified against the trust store, HTTP/2 when an upstream offers it (one
//! connection for concurrent requests) and HTTP/1.1 when it does not, and SOCKS5 proxies.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What an HTTPS mock saw: connections accepted and the HTTP version of each request.
#[derive(Default)]
pub(crate) struct TlsSeen {
    pub(crate) connections: AtomicUsize,
    pub(crate) versions: Mutex<Vec<http::Version>>,
}

/// A self-signed certificate for `localhost`: (certificate PEM, certificate DER, PKCS#8 key DER).
pub(crate) fn localhost_cert() -> (String, Vec<u8>, Vec<u8>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        made.cert.pem(),
        made.cert.der().to_vec(),
        made.signing_key.serialize_der(),
    )
}

/// An HTTPS chat upstream on loopback that offers `alpn` and answers every request with a completion.
pub(crate) async fn tls_mock(cert: &[u8], key: &[u8], alpn: &[&[u8]]) -> (u16, Arc<TlsSeen>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(TlsSeen::default());
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            record.connections.fetch_add(1, Ordering::SeqCst);
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: http::Request<_>| {
                    let record = record.clone();
                    async move {
                        record.versions.lock().unwrap().push(request.version());
                        // Every answer waits a little, so that concurrent requests overlap.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let body = completion("m", "over TLS").to_string();
                        let response = http::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn https_upstreams_are_verified_and_spoken_to_in_http2_when_they_offer_it() {
    let (pem, cert, key) = localhost_cert();
    let (h2_port, h2_seen) = tls_mock(&cert, &key, &[b"h2", b"http/1.1"]).await;
    let (h1_port, h1_seen) = tls_mock(&cert, &key, &[b"http/1.1"]).await;
    // The same name, another certificate: not in the trust store.
    let (_, other_cert, other_key) = localhost_cert();
    let (untrusted_port, untrusted_seen) = tls_mock(&other_cert, &other_key, &[b"h2"]).await;

    let dir = tempfile::tempdir().unwrap();
    let upstreams = [
        ("two", h2_port),
        ("one", h1_port),
        ("untrusted", untrusted_port),
    ];
    let mut env = format!("PROXY_API_KEY={PROXY_KEY}\n");
    for (i, (name, port)) in upstreams.iter().enumerate() {
        let base = format!("https://localhost:{port}/v1");
        write(
            dir.path(),
            &format!("providers/{name}.yaml"),
            &provider_yaml(&base, ""),
        );
        env.push_str(&format!("{}_API_KEY={}\n", name.to_uppercase(), key_for(i)));
    }
    write(dir.path(), ".env", &env);
    write(
        dir.path(),
        "config.yaml",
        "retries: {attempts: 1}\nconcurrency: {per_key_model: 0}\n",
    );
    write(dir.path(), "trust.pem", &pem);
    let trust = dir.path().join("trust.pem");
    let served = start(
        dir.path(),
        &[("SSL_CERT_FILE", trust.to_str().unwrap())],
        None,
    );
    let chat = |model: &str| served.chat(model);

    // HTTP/2: once a connection is open, eight requests at once share it. (On a cold pool, requests that start
    // together each open one: the protocol is only known after the handshake.)
    let (status, _, body) = send(chat("two/m")).await;
    assert_eq!(status, 200, "{body}");
    let answers = futures_util::future::join_all((0..8).map(|_| send(chat("two/m")))).await;
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "over TLS");
    }
    assert_eq!(
        h2_seen.versions.lock().unwrap().clone(),
        vec![http::Version::HTTP_2; 9]
    );
    assert_eq!(h2_seen.connections.load(Ordering::SeqCst), 1);

    // HTTP/1.1 when the upstream offers nothing else.
    let (status, _, body) = send(chat("one/m")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "over TLS");
    assert_eq!(
        h1_seen.versions.lock().unwrap().clone(),
        [http::Version::HTTP_11]
    );

    // A certificate the trust store does not vouch for: no request is sent, and the log says why.
    let (status, _, body) = send(chat("untrusted/m")).await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("(connection x1)"), "{message}");
    assert!(untrusted_seen.versions.lock().unwrap().is_empty());
    let log = served
        .log_once("the refused certificate", |l| {
            l.contains("untrusted/m") && l.contains("status=503")
        })
        .await;
    assert!(
        log.contains("cause=connection failed: invalid peer certificate"),
        "{log}"
    );
    assert!(!log.contains(&key_for(2)), "no key in the log");
}

/// A distinct provider key per upstream.
fn key_for(i: usize) -> String {
    key(i + 1)
}

/// A SOCKS5 proxy on loopback that asks for a user name and password, resolves the names it is given to
/// loopback, and records "user:password -> host:port" for each connection.
fn socks5_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let (conn, record) = (conn.unwrap(), record.clone());
            std::thread::spawn(move || {
                if let Some((entry, upstream)) = socks5_handshake(&conn) {
                    record.lock().unwrap().push(entry);
                    pipe(conn, upstream);
                }
            });
        }
    });
    (port, seen)
}

/// The SOCKS5 greeting, username/password authentication (RFC 1929) and CONNECT; the connection to the target.
fn socks5_handshake(mut conn: &TcpStream) -> Option<(String, TcpStream)> {
    let read = move |n: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        let mut from = conn;
        from.read_exact(&mut buf).ok()?;
        Some(buf)
    };
    let greeting = read(2)?;
    let methods = read(usize::from(greeting[1]))?;
    if greeting[0] != 5 || !methods.contains(&2) {
        return None;
    }
    conn.write_all(&[5, 2]).ok()?;
    let version = read(1)?;
    let user_len = read(1)?;
    let user = read(usize::from(user_len[0]))?;
    let password_len = read(1)?;
    let password = read(usize::from(password_len[0]))?;
    if version[0] != 1 {
        return None;
    }
    conn.write_all(&[1, 0]).ok()?;
    let request = read(4)?;
    if request[..3] != [5, 1, 0] {
        return None;
    }
    let host = match request[3] {
        3 => {
            let len = read(1)?;
            String::from_utf8(read(usize::from(len[0]))?).ok()?
        }
        1 => {
            let ip = read(4)?;
            std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()
        }
        _ => return None,
    };
    let port_bytes = read(2)?;
    let port = u16::from_be_bytes([port_bytes[0], port_bytes[1]]);
    let upstream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).ok()?;
    let entry = format!(
        "{}:{} -> {host}:{port}",
        String::from_utf8_lossy(&user),
        String::from_utf8_lossy(&password)
    );
    Some((entry, upstream))
}

/// Copies both ways until either side closes.
fn pipe(client: TcpStream, upstream: TcpStream) {
    let (mut client_in, mut upstream_out) =
        (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let (mut upstream_in, mut client_out) = (upstream, client);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut upstream_out);
        let _ = upstream_out.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream_in, &mut client_out);
    let _ = client_out.shutdown(std::net::Shutdown::Write);
}

#[tokio::test]
async fn upstream_requests_go_through_a_socks5_proxy_that_resolves_names() {
    let (socks_port, seen) = socks5_proxy();
    let behind = Mock::echo("via socks").await;
    let upstream_port = behind
        .base_url
        .trim_end_matches("/v1")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    // A name only the proxy resolves: with socks5h:// keyrelay never looks it up itself.
    write(
        dir.path(),
        "providers/far.yaml",
        &provider_yaml(&format!("http://upstream.test:{upstream_port}/v1"), ""),
    );
    write(
        dir.path(),
        ".env",
        &format!("PROXY_API_KEY={PROXY_KEY}\nFAR_API_KEY={}\n", key(1)),
    );
    let proxy = format!("socks5h://user:pa55@127.0.0.1:{socks_port}");
    let served = start(dir.path(), &[("ALL_PROXY", &proxy)], None);
    let (status, _, body) = send(served.chat("far/m")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "via socks");
    assert_eq!(
        seen.lock().unwrap().clone(),
        [format!("user:pa55 -> upstream.test:{upstream_port}")]
    );
    let upstream_saw = behind.chats();
    assert_eq!(upstream_saw.len(), 1);
    assert_eq!(upstream_saw[0].key, key(1));
    let log = served
        .log_once("the request", |l| {
            l.contains("far/m") && l.contains("status=200")
        })
        .await;
    assert!(
        !log.contains("pa55"),
        "the proxy's password is not logged: {log}"
    );
}
