//! Live configuration: files edited under a running keyrelay take effect without a restart, broken edits are
//! rejected while the last good configuration keeps serving, and key state survives reloads.

use crate::support::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

async fn status(proxy: &Proxy) -> Value {
    send(proxy.get("/")).await.2
}

fn providers_dir(proxy: &Proxy) -> std::path::PathBuf {
    proxy.dir.path().join("providers")
}

fn write_env(proxy: &Proxy, keys: &[usize]) {
    let mut env = format!("PROXY_API_KEY={PROXY_KEY}\n");
    for i in keys {
        env.push_str(&format!("MOCK_API_KEY_{i}={}\n", key(*i)));
    }
    std::fs::write(proxy.dir.path().join(".env"), env).unwrap();
}

#[tokio::test]
async fn a_dropped_provider_serves_a_deleted_one_404s_and_an_edited_url_moves_traffic() {
    let first = Mock::echo("first upstream").await;
    let second = Mock::echo("second upstream").await;
    let setup = Setup {
        env: mock_keys("MOCK", 1),
        ..Setup::empty()
    };
    let proxy = Proxy::start(setup).await;
    assert_eq!(proxy.chat("mock/m", "hi").await.0, 404);

    let file = providers_dir(&proxy).join("mock.yaml");
    std::fs::write(&file, provider_yaml(&first.base_url, "")).unwrap();
    eventually("the new provider serves", || async {
        proxy.chat("mock/m", "hi").await.0 == 200
    })
    .await;
    assert_eq!(
        proxy.chat("mock/m", "hi").await.2["choices"][0]["message"]["content"],
        "first upstream"
    );

    std::fs::write(&file, provider_yaml(&second.base_url, "")).unwrap();
    eventually("traffic moves to the new base URL", || async {
        proxy.chat("mock/m", "hi").await.2["choices"][0]["message"]["content"] == "second upstream"
    })
    .await;

    // Another provider file, then the first deleted: its models 404. (Deleting the last provider file is a
    // narrowing the operator confirms: tests/it/hardening.rs.)
    let other = providers_dir(&proxy).join("other.yaml");
    std::fs::write(&other, provider_yaml(&first.base_url, "")).unwrap();
    std::fs::remove_file(&file).unwrap();
    eventually("the deleted provider's models 404", || async {
        let (status, _, body) = proxy.chat("mock/m", "hi").await;
        status == 404 && error_code(&body) == "unknown_provider"
    })
    .await;
    let generation = status(&proxy).await["config"]["generation"]
        .as_u64()
        .unwrap();
    assert!(generation >= 4, "{generation}");
}

/// Saves `text` into `path` the way `style` does it, and waits until the proxy serves `expect`.
async fn save_and_expect(proxy: &Proxy, style: &str, path: &Path, text: &str, expect: &str) {
    let dir = path.parent().unwrap();
    match style {
        "in-place" => {
            use std::io::{Seek, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(0).unwrap();
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
        "rename" => {
            let tmp = dir.join(".mock.yaml.swp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        "recreate" => {
            std::fs::remove_file(path).unwrap();
            // The scenario: a moment when the file is gone, as an editor that deletes and writes anew leaves it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            std::fs::write(path, text).unwrap();
        }
        "symlink" => {
            let versions = dir.parent().unwrap().join("versions");
            std::fs::create_dir_all(&versions).unwrap();
            let target = versions.join(format!("{expect}.yaml").replace(' ', "-"));
            std::fs::write(&target, text).unwrap();
            let tmp = dir.join(".mock.yaml.link");
            std::os::unix::fs::symlink(&target, &tmp).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        _ => unreachable!(),
    }
    eventually(&format!("{style} save is picked up"), || async {
        proxy.chat("mock/m", "hi").await.2["choices"][0]["message"]["content"] == expect
    })
    .await;
}

#[tokio::test]
async fn every_save_style_is_picked_up() {
    let mocks = [
        Mock::echo("a").await,
        Mock::echo("b").await,
        Mock::echo("c").await,
        Mock::echo("d").await,
        Mock::echo("e").await,
    ];
    let proxy = Proxy::start(Setup::one(&mocks[0], 1)).await;
    let path = providers_dir(&proxy).join("mock.yaml");
    assert_eq!(
        proxy.chat("mock/m", "hi").await.2["choices"][0]["message"]["content"],
        "a"
    );
    for (style, (mock, expect)) in ["in-place", "rename", "recreate", "symlink"]
        .iter()
        .zip(mocks[1..].iter().zip(["b", "c", "d", "e"]))
    {
        save_and_expect(
            &proxy,
            style,
            &path,
            &provider_yaml(&mock.base_url, ""),
            expect,
        )
        .await;
    }
}

#[tokio::test]
async fn a_kubernetes_style_directory_swap_is_picked_up() {
    let old = Mock::echo("old config").await;
    let new = Mock::echo("new config").await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // ConfigMap layout: the visible names are symlinks through `..data`, which is swapped atomically.
    let v1 = root.join("..v1");
    std::fs::create_dir_all(v1.join("providers")).unwrap();
    std::fs::write(
        v1.join("providers/mock.yaml"),
        provider_yaml(&old.base_url, ""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/providers", root.join("providers")).unwrap();
    let setup = Setup {
        env: mock_keys("MOCK", 1),
        ..Setup::empty()
    };
    let proxy = Proxy::start_in(setup, dir).await;
    assert_eq!(
        proxy.chat("mock/m", "hi").await.2["choices"][0]["message"]["content"],
        "old config"
    );

    let root = proxy.dir.path();
    let v2 = root.join("..v2");
    std::fs::create_dir_all(v2.join("providers")).unwrap();
    std::fs::write(
        v2.join("providers/mock.yaml"),
        provider_yaml(&new.base_url, ""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    eventually("the swapped directory serves", || async {
        proxy.chat("mock/m", "hi").await.2["choices"][0]["message"]["content"] == "new config"
    })
    .await;
    // And the watch follows the new directory: a later edit inside it is seen too.
    std::fs::write(
        v2.join("providers/mock.yaml"),
        provider_yaml(&old.base_url, ""),
    )
    .unwrap();
    eventually("an edit in the new directory is seen", || async {
        proxy.chat("mock/m", "hi").await.2["choices"][0]["message"]["content"] == "old config"
    })
    .await;
}

#[tokio::test]
async fn broken_edits_are_rejected_and_reported_until_fixed() {
    let mock = Mock::echo("still serving").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let good_provider = provider_yaml(&mock.base_url, "");
    let provider_file = providers_dir(&proxy).join("mock.yaml");
    let config_file = proxy.dir.path().join("config.yaml");
    let broken: [(&Path, &str, &str); 3] = [
        (&provider_file, "base_url: [unclosed\n", "mock.yaml:1"),
        (
            &provider_file,
            "base_url: http://127.0.0.1:9/v1\nerrors: [{status: 429, class: teapot}]\n",
            "unknown variant `teapot`",
        ),
        (
            &config_file,
            "request_timout: 5s\n",
            "config.yaml:1: unknown field `request_timout`",
        ),
    ];
    for (file, text, expected) in broken {
        std::fs::write(file, text).unwrap();
        eventually(&format!("GET / reports {expected}"), || async {
            status(&proxy).await["config"]["last_reload_error"]
                .as_str()
                .is_some_and(|e| e.contains(expected))
        })
        .await;
        let (code, _, body) = proxy.chat("mock/m", "hi").await;
        assert_eq!(
            (code, body["choices"][0]["message"]["content"].as_str()),
            (200, Some("still serving"))
        );
        std::fs::write(&provider_file, &good_provider).unwrap();
        std::fs::write(&config_file, "").unwrap();
        eventually("fixing the file clears the error", || async {
            status(&proxy).await["config"]["last_reload_error"].is_null()
        })
        .await;
    }
    assert_eq!(
        status(&proxy).await["config"]["generation"],
        1,
        "no broken configuration was ever published"
    );
}

#[tokio::test]
async fn env_edits_change_the_pool_and_cooldowns_survive() {
    let limited = key(1);
    let limited_in_mock = limited.clone();
    let mock = Mock::start(move |seen, _| {
        if seen.key == limited_in_mock {
            Reply::error(429, "slow down", "requests", "rate_limit_exceeded")
                .with_header("retry-after", "600")
        } else {
            Reply::ok(completion(seen.model(), "ok"))
        }
    })
    .await;
    let proxy = Proxy::start(Setup::one(&mock, 2).config("selection: sequential\n")).await;
    assert_eq!(proxy.chat("mock/m", "hi").await.0, 200);
    assert_eq!(
        mock.chats().iter().filter(|s| s.key == limited).count(),
        1,
        "key 1 rate-limited, now cooling"
    );

    // Add key 3, remove key 2: key 1 keeps cooling, so key 3 serves alone.
    write_env(&proxy, &[1, 3]);
    eventually("the new pool is live", || async {
        let (_, headers, _) = proxy.chat("mock/m", "hi").await;
        header(&headers, "x-keyrelay-key") == masked(3)
    })
    .await;
    let before = mock.chats().len();
    for _ in 0..5 {
        let (status, headers, _) = proxy.chat("mock/m", "hi").await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-keyrelay-key"), masked(3));
    }
    let after: Vec<Seen> = mock.chats()[before..].to_vec();
    assert!(
        after.iter().all(|s| s.key == key(3)),
        "the removed key and the cooling key serve nothing"
    );
    let (_, _, providers) = send(proxy.get("/v1/providers")).await;
    assert_eq!(providers["data"][0]["keys"], 2);
    assert_eq!(
        providers["data"][0]["keys_cooling"], 1,
        "the cooldown survived the reload"
    );
}

#[tokio::test]
async fn fifty_reloads_under_load_fail_no_request_and_cut_no_stream() {
    let mock = Mock::start(|seen, _| {
        if seen.body.get("stream") == Some(&Value::Bool(true)) {
            let words: Vec<String> = (0..20).map(|i| format!("w{i} ")).collect();
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            Reply::Sse {
                events: chunks(seen.model(), &words, false),
                gap: Duration::from_millis(5),
                end: End::Done,
            }
        } else {
            Reply::ok(completion(seen.model(), "ok")).delayed(Duration::from_millis(5))
        }
    })
    .await;
    let proxy =
        Proxy::start(Setup::one(&mock, 4).config("concurrency: {per_key_model: 0}\n")).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (client, url, stop) = (proxy.client.clone(), proxy.url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let stream = w % 2 == 0;
                    let body = json!({"model": "mock/m", "stream": stream, "messages": []});
                    let response = client
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(PROXY_KEY)
                        .json_body(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    let text = response.text().await.unwrap();
                    if stream {
                        let data = sse_data(&text);
                        assert_eq!(
                            data.last().map(String::as_str),
                            Some("[DONE]"),
                            "a stream was cut: {text}"
                        );
                        assert_eq!(reassemble(&data).split_whitespace().count(), 20);
                    } else {
                        assert!(text.contains("\"ok\""), "{text}");
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();
    let file = providers_dir(&proxy).join("mock.yaml");
    for i in 0..50 {
        // Alternate a real change (the static model list) so that every save publishes a new snapshot.
        let yaml =
            provider_yaml(&mock.base_url, "").replace("static-model", &format!("static-model-{i}"));
        std::fs::write(&file, yaml).unwrap();
        let want = i + 2;
        eventually("the reload is published", || async {
            status(&proxy).await["config"]["generation"].as_u64() == Some(want)
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w.await.expect("a worker saw a failed request");
    }
    assert!(total > 50, "{total}");
}

#[tokio::test]
async fn broken_or_missing_scripts_are_rejected_until_fixed() {
    let mock = Mock::start(|_, _| Reply::ok(json!({"text": "scripted"}))).await;
    let good = "fn request(ctx) { #{ path: \"/go\", body: #{ q: 1 } } }\nfn response(ctx) { #{ id: \"x\", object: \"chat.completion\", created: 0, model: ctx.model, choices: [#{ index: 0, message: #{ role: \"assistant\", content: ctx.body.text }, finish_reason: \"stop\" }] } }\n";
    let setup = Setup {
        env: mock_keys("SCRIPTED", 1),
        ..Setup::empty()
    }
    .provider(
        "scripted",
        format!("base_url: {}\nscript: s.rhai\n", mock.base_url),
    )
    .plugin("s.rhai", good);
    let proxy = Proxy::start(setup).await;
    assert_eq!(
        proxy.chat("scripted/m", "hi").await.2["choices"][0]["message"]["content"],
        "scripted"
    );
    let plugin = proxy.dir.path().join("plugins/s.rhai");
    let provider = providers_dir(&proxy).join("scripted.yaml");

    std::fs::write(&plugin, "fn request(ctx) {\n  let x = ;\n}\n").unwrap();
    eventually("a syntax error is reported with file and line", || async {
        status(&proxy).await["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("s.rhai:2") && e.contains("does not compile"))
    })
    .await;
    assert_eq!(
        proxy.chat("scripted/m", "hi").await.0,
        200,
        "the old script keeps serving"
    );

    std::fs::write(&plugin, "fn request(ctx) { undefined_variable }\n").unwrap();
    eventually("an undefined variable is a load error", || async {
        status(&proxy).await["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("undefined_variable"))
    })
    .await;

    std::fs::write(&plugin, good).unwrap();
    std::fs::write(
        &provider,
        format!("base_url: {}\nscript: missing.rhai\n", mock.base_url),
    )
    .unwrap();
    eventually("a missing script is reported", || async {
        status(&proxy).await["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("missing.rhai") && e.contains("cannot read"))
    })
    .await;
    assert_eq!(proxy.chat("scripted/m", "hi").await.0, 200);

    std::fs::write(
        &provider,
        format!(
            "base_url: {}\nscript: s.rhai\nhooks: [request, stream_event]\n",
            mock.base_url
        ),
    )
    .unwrap();
    eventually("a hook the script lacks is reported", || async {
        status(&proxy).await["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("stream_event"))
    })
    .await;

    std::fs::write(
        &provider,
        format!("base_url: {}\nscript: s.rhai\n", mock.base_url),
    )
    .unwrap();
    eventually("fixing it clears the error", || async {
        status(&proxy).await["config"]["last_reload_error"].is_null()
    })
    .await;
    assert_eq!(proxy.chat("scripted/m", "hi").await.0, 200);
}

#[tokio::test]
async fn a_reload_never_opens_the_proxy_to_everyone() {
    let mock = Mock::echo("hi").await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", "host: 0.0.0.0\n");
    write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&mock.base_url, ""),
    );
    let env = format!("PROXY_API_KEY={PROXY_KEY}\nMOCK_API_KEY_1={}\n", key(1));
    write(dir.path(), ".env", &env);
    let server = start(dir.path(), &[], None);
    let url = server.url.replace("0.0.0.0", "127.0.0.1");
    let client = http_client();
    let anonymous = || {
        let body = json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]});
        send(
            client
                .post(format!("{url}/v1/chat/completions"))
                .json_body(&body),
        )
    };
    assert_eq!(anonymous().await.0, 401);
    // The key dropped from .env, then .env deleted: both refused, the key still required.
    for edit in ["drop the key", "delete .env"] {
        match edit {
            "drop the key" => write(dir.path(), ".env", &format!("MOCK_API_KEY_1={}\n", key(1))),
            _ => std::fs::remove_file(dir.path().join(".env")).unwrap(),
        }
        let refused = |l: &String| l.contains("configuration rejected");
        eventually(edit, || async { server.log().iter().any(refused) }).await;
        assert_eq!(anonymous().await.0, 401, "{edit}");
        let (status, _, body) = send(
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(PROXY_KEY)
                .json_body(
                    &json!({"model": "mock/m", "messages": [{"role": "user", "content": "hi"}]}),
                ),
        )
        .await;
        assert_eq!(status, 200, "{edit}: {body}");
        let (_, _, live) = send(client.get(format!("{url}/")).bearer_auth(PROXY_KEY)).await;
        let error = live["config"]["last_reload_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains("PROXY_API_KEY is no longer set") || error.contains("no longer exist"),
            "{edit}: {live}"
        );
        write(dir.path(), ".env", &env);
        eventually("the key back", || async {
            let (_, _, live) = send(client.get(format!("{url}/")).bearer_auth(PROXY_KEY)).await;
            live["config"]["last_reload_error"].is_null()
        })
        .await;
        server.lines.lock().unwrap().clear();
    }
}

#[tokio::test]
async fn a_vanished_providers_directory_is_waited_out_not_published() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    let providers = providers_dir(&proxy);
    let aside = proxy.dir.path().join("providers.moved");
    std::fs::rename(&providers, &aside).unwrap();
    eventually("the rejection", || async {
        status(&proxy).await["config"]["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("no longer exists"))
    })
    .await;
    let (status_code, _, body) = proxy.chat("mock/m", "hi").await;
    assert_eq!(status_code, 200, "still serving: {body}");
    std::fs::rename(&aside, &providers).unwrap();
    eventually("recovery", || async {
        status(&proxy).await["config"]["last_reload_error"].is_null()
    })
    .await;
    assert_eq!(status(&proxy).await["config"]["generation"], 1);
}

#[tokio::test]
async fn files_that_are_not_configuration_trigger_no_reload() {
    let mock = Mock::echo("hi").await;
    let proxy = Proxy::start(Setup::one(&mock, 1)).await;
    // A broken config.yaml: every reload attempt now counts a failure.
    std::fs::write(proxy.dir.path().join("config.yaml"), "request_timout: 5s\n").unwrap();
    let failures = || async {
        let text = proxy.get_text("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix("keyrelay_config_reload_failures_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap()
    };
    eventually("the broken edit", || async { failures().await == 1 }).await;
    // Logs and other files written beside the configuration.
    for i in 0..5 {
        std::fs::write(proxy.dir.path().join("keyrelay.log"), format!("line {i}\n")).unwrap();
        std::fs::write(proxy.dir.path().join("providers/notes.txt"), "x").unwrap();
        // Spread over more than the watcher's debounce, so that each write could trigger a reload of its own.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // What must not happen has nothing to wait for: time for a reload the writes wrongly triggered to be
    // counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failures().await, 1);
}
