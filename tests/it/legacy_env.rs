//! A `.env` written for the Python key proxy keyrelay succeeds: what keyrelay has the concept for is honoured,
//! the rest is named in a warning, and `keyrelay check` shows how each variable was read.

use crate::support::*;

fn old_proxy_dir(mock: &Mock) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.yaml", "");
    write(
        dir.path(),
        "providers/mock.yaml",
        &provider_yaml(&mock.base_url, ""),
    );
    let env = format!(
        "PROXY_API_KEY={PROXY_KEY}\n\
         MOCK_API_KEY_BACKUP={}\n\
         MOCK_API_KEY_0={}\n\
         ROTATION_MODE_MOCK=sequential\n\
         MAX_CONCURRENT_REQUESTS_PER_KEY_MOCK=2\n\
         GLOBAL_TIMEOUT=7\n\
         MOCK_MODELS=[\"m-a\", \"m-b\"]\n\
         IGNORE_MODELS_MOCK=*\n\
         WHITELIST_MODELS_MOCK=m-a\n\
         TIMEOUT_READ_STREAMING=300\n",
        key(1),
        key(2)
    );
    write(dir.path(), ".env", &env);
    // Another env file beside it: read too, but `.env` wins where both set a variable.
    write(
        dir.path(),
        "extra.env",
        &format!("MOCK_API_KEY_2={}\nGLOBAL_TIMEOUT=99\n", key(3)),
    );
    dir
}

#[tokio::test]
async fn the_python_proxys_env_carries_over() {
    let mock = Mock::echo("carried over").await;
    let dir = old_proxy_dir(&mock);

    let (passed, text) = check(dir.path());
    assert!(passed, "{text}");
    assert!(
        text.contains("3 keys"),
        "any _API_KEY suffix, and extra.env: {text}"
    );
    assert!(text.contains("sequential selection"), "{text}");
    for read in [
        "ROTATION_MODE_MOCK=sequential",
        "MAX_CONCURRENT_REQUESTS_PER_KEY_MOCK=2",
        "GLOBAL_TIMEOUT=7",
        "MOCK_MODELS",
    ] {
        assert!(
            text.contains(read),
            "check shows how {read} was read: {text}"
        );
    }
    assert!(
        text.contains("warning: TIMEOUT_READ_STREAMING: not honoured"),
        "{text}"
    );
    assert!(
        !text.contains("99"),
        "extra.env does not override .env: {text}"
    );

    let served = start(dir.path(), &[], None);
    let models = served.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"mock/m-a"),
        "the whitelist wins over IGNORE=*: {ids:?}"
    );
    assert!(!ids.contains(&"mock/m-b"), "{ids:?}");
    let chat = |model: &str| served.chat(model).send();
    assert_eq!(chat("mock/m-a").await.unwrap().status(), 200);
    assert_eq!(chat("mock/m-b").await.unwrap().status(), 404);
    served
        .log_once("the warning at start", |l| {
            l.contains("TIMEOUT_READ_STREAMING")
        })
        .await;
}
