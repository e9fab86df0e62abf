//! The HTTP endpoint Prometheus scrapes.
//!
//! hyper directly (HTTP/1.1 only) rather than a web framework: one route does not
//! justify a router's dependency tree.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use log::debug;
use tokio::{net::TcpListener, sync::watch};

/// Produces the metrics text for one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Content type of the Prometheus text exposition format.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long in-flight scrapes may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(1);

/// Serves until `shutdown` turns true, then lets in-flight requests finish (up to 1 s).
pub async fn serve(listener: TcpListener, render: Render, mut shutdown: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    log::warn!("accepting a scrape connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => break,
        };
        let render = render.clone();
        let service = service_fn(move |req| {
            let render = render.clone();
            async move { Ok::<_, Infallible>(respond(&req, &render)) }
        });
        let conn = graceful.watch(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                debug!("scrape connection: {err}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        debug!("scrape connections still open after {DRAIN:?}; dropping them");
    }
}

fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into(), "text/plain")
            .map(|mut r| {
                r.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("static header"));
                r
            })
            .unwrap_or_else(|_| Response::new(Full::default()));
    }
    let (status, body, kind) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, render(), EXPOSITION),
        "/" => (StatusCode::OK, "tcptrace: metrics are at /metrics\n".into(), "text/plain"),
        _ => (StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n".into(), "text/plain"),
    };
    let body = if head { String::new() } else { body };
    text(status, body, kind).unwrap_or_else(|_| Response::new(Full::default()))
}

fn text(status: StatusCode, body: String, kind: &'static str) -> hyper::http::Result<Response<Full<Bytes>>> {
    Response::builder().status(status).header(CONTENT_TYPE, kind).body(Full::new(Bytes::from(body)))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest_then_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let render: Render = Arc::new(|| "tcptrace_events_total 7\n".to_string());
        let server = tokio::spawn(serve(listener, render, rx));

        let replies = tokio::task::spawn_blocking(move || {
            [
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            ]
            .map(|r| get(addr, r))
        })
        .await
        .unwrap();
        assert!(replies[0].starts_with("HTTP/1.1 200"), "{}", replies[0]);
        assert!(replies[0].contains(EXPOSITION));
        assert!(replies[0].ends_with("tcptrace_events_total 7\n"));
        assert!(replies[1].starts_with("HTTP/1.1 404"));
        assert!(replies[2].starts_with("HTTP/1.1 405") && replies[2].contains("allow: GET, HEAD"));
        assert!(replies[3].starts_with("HTTP/1.1 200") && !replies[3].contains("tcptrace_events_total"));

        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(3), server).await.unwrap().unwrap();
        assert!(std::net::TcpStream::connect(addr).is_err(), "the listener is closed");
    }
}
