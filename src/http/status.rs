//! What operators read: liveness (`GET /`), providers, keys, metrics and the dashboard.

use super::auth::refusal;
use super::{ApiError, AppState};
use crate::keys::{Counters, KeyAction, KeyStatus};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// `GET /`: whether the service is up; with the proxy key (or when none is configured), the configuration's
/// state too.
pub(super) async fn liveness(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if refusal(&app, &headers).is_some() {
        return axum::Json(json!({"status": "ok"})).into_response();
    }
    let snapshot = app.relay.snapshot();
    let status = match &app.reloader {
        Some(r) => r.status(),
        None => crate::reload::ReloadStatus {
            generation: snapshot.generation,
            loaded_at: snapshot.loaded_at,
            ..Default::default()
        },
    };
    axum::Json(json!({
        "status": "ok",
        "service": "keyrelay",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "providers": snapshot.serving().count(),
        "store": app.relay.store().kind(),
        "config": {
            "generation": status.generation,
            "loaded_at": time(status.loaded_at),
            "last_reload_error": status.last_error,
            "last_reload_error_at": status.last_error_at.and_then(time),
        },
    }))
    .into_response()
}

pub(super) async fn providers(State(app): State<AppState>) -> Response {
    let snapshot = app.relay.snapshot();
    let now = app.relay.clock().now();
    let mut data = Vec::with_capacity(snapshot.providers.len());
    for p in snapshot.providers.values() {
        let report = app.relay.store().report(&p.name, &p.keys).await;
        let cooling = report
            .iter()
            .filter(|k| k.cooling_until.is_some_and(|u| u > now) || !k.model_cooldowns.is_empty())
            .count();
        data.push(json!({
            "name": p.name,
            "keys": p.keys.len(),
            "keys_in_flight": report.iter().map(|k| k.in_flight).sum::<u32>(),
            "keys_cooling": cooling,
            "base_url": crate::upstream::public_url(&p.base_url),
            "selection": p.tuning.selection,
            "static_models": p.static_models.len(),
            "script": p.script.as_ref().map(|s| s.file.display().to_string()),
            "script_errors": p.script.as_ref().map_or(0, |s| s.error_count()),
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/keys`: every key of every provider (masked), with its live state.
pub(super) async fn keys(State(app): State<AppState>) -> Response {
    let snapshot = app.relay.snapshot();
    let now = app.relay.clock().now();
    let mut data = Vec::new();
    for p in snapshot.serving() {
        let report = app.relay.store().report(&p.name, &p.keys).await;
        let keys: Vec<Value> = report.iter().map(|k| key_json(k, now)).collect();
        data.push(json!({"provider": p.name, "keys": keys}));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// One key's state as the API shows it.
fn key_json(k: &KeyStatus, now: i64) -> Value {
    let left = |until: i64| ((until - now).max(0) as f64 / 1000.0).ceil() as u64;
    let cooldown = k.cooling_until.map(|until| {
        json!({"reason": k.cooling_reason, "until": time(until), "seconds_left": left(until)})
    });
    let models: Vec<Value> = k
        .model_cooldowns
        .iter()
        .map(|(model, until, reason)| {
            json!({"model": model, "reason": reason, "until": time(*until), "seconds_left": left(*until)})
        })
        .collect();
    json!({
        "key": k.key,
        "id": k.id,
        "state": k.state(),
        "disabled": k.disabled,
        "in_flight": k.in_flight,
        "cooldown": cooldown,
        "model_cooldowns": models,
        "streak": k.streak,
        "today": counters(&k.today),
        "lifetime": counters(&k.lifetime),
        "models": k.models.iter().map(|(model, today, lifetime)| {
            json!({"model": model, "today": counters(today), "lifetime": counters(lifetime)})
        }).collect::<Vec<_>>(),
        "last_error": k.last_error.map(|(class, at)| json!({"class": class, "at": time(at)})),
    })
}

/// Counters as the API shows them: the cost in dollars (zero where no model had a price).
fn counters(c: &Counters) -> Value {
    json!({
        "requests": c.requests,
        "successes": c.successes,
        "failures": c.failures,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "cost_usd": c.cost.usd(),
    })
}

/// `POST /v1/keys/{id}/{action}`: an operator's action on one key (by the `id` `/v1/keys` shows): `reset` ends
/// its cooldowns and streaks (only for `{"model": …}` when the body names one), `disable` takes it out of
/// rotation until `enable`. Answers the key's new state.
pub(super) async fn key_action(
    State(app): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Body,
) -> Response {
    let snapshot = app.relay.snapshot();
    let found = snapshot
        .providers
        .values()
        .find_map(|p| Some((p, p.keys.iter().find(|k| k.id.to_string() == id)?)));
    let Some((provider, key)) = found else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_key",
            format!("no key has the id {id:?}; GET /v1/keys lists them"),
        )
        .into_response();
    };
    let action = match action.as_str() {
        "disable" => KeyAction::Disable,
        "enable" => KeyAction::Enable,
        "reset" => {
            let within = snapshot.settings.edge.body_timeout;
            let read = tokio::time::timeout(within, axum::body::to_bytes(body, 64 << 10)).await;
            let Ok(Ok(bytes)) = read else {
                return bad_action("the body must be at most 64 KiB and arrive in time");
            };
            let model = match serde_json::from_slice::<Value>(&bytes) {
                _ if bytes.iter().all(u8::is_ascii_whitespace) => None,
                // The model as `/v1/keys` shows it; `provider/model` and aliases are accepted too.
                Ok(Value::Object(o)) => match o.get("model") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(m)) => {
                        let m = snapshot.canonical(m);
                        let prefix = format!("{}/", provider.name);
                        Some(m.strip_prefix(&prefix).unwrap_or(&m).to_string())
                    }
                    Some(_) => return bad_action("`model` must be a string"),
                },
                _ => return bad_action("the body must be empty or {\"model\": \"<model>\"}"),
            };
            KeyAction::Reset { model }
        }
        other => {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_route",
                format!("{other:?} is not an action on a key: use reset, disable or enable"),
            )
            .into_response();
        }
    };
    let store = app.relay.store();
    if !store.control(&provider.name, key, &action) {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_model",
            "this key has no state for that model; /v1/keys lists the models it is cooling for",
        )
        .into_response();
    }
    tracing::info!(provider = %provider.name, key = %key.masked, action = ?action, "operator action on a key");
    let status = store
        .report(&provider.name, std::slice::from_ref(key))
        .await;
    let now = app.relay.clock().now();
    axum::Json(json!({"provider": provider.name, "key": status.first().map(|k| key_json(k, now))}))
        .into_response()
}

fn bad_action(message: &str) -> Response {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
        message,
    )
    .into_response()
}

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(State(app): State<AppState>) -> Response {
    let snapshot = app.relay.snapshot();
    let mut gauges = crate::observe::metrics::Gauges::default();
    for p in snapshot.serving() {
        for state in ["available", "busy", "cooling", "benched", "disabled"] {
            gauges.keys.insert((p.name.clone(), state), 0);
        }
        for k in app.relay.store().report(&p.name, &p.keys).await {
            *gauges.keys.entry((p.name.clone(), k.state())).or_default() += 1;
        }
        if let Some(script) = &p.script {
            gauges
                .script_errors
                .insert(p.name.clone(), script.error_count());
        }
    }
    match &app.reloader {
        Some(r) => {
            let status = r.status();
            gauges.config_generation = status.generation;
            gauges.reload_failures = status.failures;
        }
        None => gauges.config_generation = snapshot.generation,
    }
    gauges.store = app.relay.store().kind();
    let mut response = app.metrics.render(&gauges).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /dashboard`: one self-contained page; it asks for the proxy key and reads `/v1/keys`. No other site may
/// frame it (a page could otherwise overlay it and steer the operator's clicks), and it is never sniffed as
/// anything but HTML.
pub(super) async fn dashboard() -> Response {
    let mut response = include_str!("dashboard.html").into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// A Unix time in milliseconds as RFC 3339.
fn time(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .ok()
}
