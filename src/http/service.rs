//! The hyper service of one connection: each request goes through the app, and the connection's state learns
//! when a request starts, when its response has been sent (its body ended or was dropped), and when a request
//! passed the proxy-key check ([`Unproven`]).

use super::conn::ConnState;
use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

pub(super) struct Routed {
    app: Router,
    state: Arc<ConnState>,
}

impl Routed {
    pub(super) fn new(app: Router, state: Arc<ConnState>) -> Self {
        Self { app, state }
    }
}

/// Carried by the requests of a connection not proven yet: the key check proves the connection through it. (Once
/// proven, its requests carry nothing.)
#[derive(Clone)]
pub(super) struct Unproven(Arc<ConnState>);

impl Unproven {
    /// The request passed the proxy-key check.
    pub(super) fn prove(&self) {
        self.0.prove();
    }
}

/// Ends the connection's request when dropped.
struct Finish(Arc<ConnState>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Routed {
    type Response = http::Response<Observed>;
    type Error = Infallible;
    type Future = RoutedFuture;

    fn call(&self, mut request: http::Request<Incoming>) -> RoutedFuture {
        if !self.state.request_started() {
            // The listener chose this connection to make room just before the request arrived.
            return RoutedFuture {
                inner: None,
                finish: None,
            };
        }
        let finish = Finish(self.state.clone());
        if !self.state.is_proven() {
            request
                .extensions_mut()
                .insert(Unproven(self.state.clone()));
        }
        let inner = tower_service::Service::call(&mut self.app.clone(), request);
        RoutedFuture {
            inner: Some(inner),
            finish: Some(finish),
        }
    }
}

pub(super) struct RoutedFuture {
    /// `None`: the connection is closing and refuses the request.
    inner: Option<axum::routing::future::RouteFuture<Infallible>>,
    finish: Option<Finish>,
}

impl Future for RoutedFuture {
    type Output = Result<http::Response<Observed>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = &mut self.inner else {
            let mut refused = super::ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "connection_closing",
                "this connection was closed to make room for others; send the request again",
            )
            .into_response();
            refused.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return Poll::Ready(Ok(refused.map(|body| Observed { body, finish: None })));
        };
        let Ok(mut response) = std::task::ready!(Pin::new(inner).poll(cx));
        let finish = self.finish.take();
        // The key check, where there is one, is behind: a connection not proven by now asked without the key. Its
        // answer is the last on the connection (a client with the key sends it with its first request), so that
        // requests pipelined without the key cannot keep a connection, and the answers they ask for, going.
        if let Some(Finish(state)) = &finish
            && !state.is_proven()
        {
            state.answered_without_key();
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(response.map(|body| Observed { body, finish })))
    }
}

/// A response body that ends its connection's request when it ends.
pub(super) struct Observed {
    body: Body,
    finish: Option<Finish>,
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.finish = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
