//! The chain explorer: a web page that lists recent transactions and shows each one as
//! its delegation tree (user -> gateway -> planner -> sub-agent -> tool), with every
//! grant, replacement, refusal, spawn lease and verification, updating live.
//!
//! [`router`] serves the page at `GET /explorer` and its two assets under
//! `/explorer/assets/`, all embedded in the binary (no CDN, no build step). The page reads
//! the explorer JSON API (`/explorer/api/txns`, `/explorer/api/txns/{txn}`,
//! `/explorer/api/changes`, served by [`crate::audit`]) from the same origin, polls for
//! changes every 2 s, and renders data only through DOM text nodes. Every response
//! carries a strict Content-Security-Policy (no inline script or style, no framing),
//! `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and
//! `Cache-Control: no-cache`.
//!
//! The page shows user names and workload identities: mount it only on the operations
//! listener (bound to 127.0.0.1 by default), next to the API it reads. The user guide is
//! `docs/explorer.md`.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! // The page alone; the token service mounts it beside the explorer API.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! axum::serve(listener, writ_txn_service::explorer::router()).await
//! # }
//! ```

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Where the page is served.
pub const PAGE_PATH: &str = "/explorer";
/// The page's script.
pub const SCRIPT_PATH: &str = "/explorer/assets/app.js";
/// The page's style sheet.
pub const STYLE_PATH: &str = "/explorer/assets/app.css";

/// The Content-Security-Policy of every explorer response: only this origin's script,
/// style and API; no inline script or style, no plugins, no framing, no `<base>`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// The explorer page and its assets (`GET /explorer`, `/explorer/assets/app.js`,
/// `/explorer/assets/app.css`). Merge it into the router that serves the explorer API.
pub fn router() -> Router {
    Router::new()
        .route(
            PAGE_PATH,
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            SCRIPT_PATH,
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            STYLE_PATH,
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// An embedded asset with the explorer's security headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 8] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // Embedded in the binary: revalidate so an upgraded service is seen at once.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
        (
            HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt as _;

    async fn get(path: &str) -> Response {
        router()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_page_and_its_assets_carry_the_security_headers() {
        for (path, kind) in [
            (PAGE_PATH, "text/html"),
            (SCRIPT_PATH, "text/javascript"),
            (STYLE_PATH, "text/css"),
        ] {
            let response = get(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let h = response.headers();
            let value = |name: &str| h.get(name).unwrap().to_str().unwrap().to_owned();
            assert!(value("content-type").starts_with(kind), "{path}");
            let csp = value("content-security-policy");
            assert!(csp.starts_with("default-src 'self';"), "{csp}");
            assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
            assert!(!csp.contains("unsafe-inline"), "{csp}");
            assert!(!csp.contains("unsafe-eval"), "{csp}");
            assert_eq!(value("x-content-type-options"), "nosniff");
            assert_eq!(value("referrer-policy"), "no-referrer");
            assert_eq!(value("cache-control"), "no-cache");
        }
    }

    #[tokio::test]
    async fn other_paths_are_not_found() {
        for path in [
            "/explorer/assets/other.js",
            "/explorer/assets/../app.js",
            "/explorer/assets/",
            "/explorer/assets/app.js/x",
        ] {
            assert_eq!(get(path).await.status(), StatusCode::NOT_FOUND, "{path}");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_no_outside_reference() {
        let page = PAGE.to_ascii_lowercase();
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains(r#"<script src="/explorer/assets/app.js" defer></script>"#));
        assert!(!page.contains("<style"));
        assert!(!page.contains("style="));
        let handler = page
            .split(|c: char| c.is_ascii_whitespace())
            .any(|word| word.starts_with("on") && word.contains('='));
        assert!(!handler, "no inline event handlers");
        for asset in [
            &page,
            &SCRIPT.to_ascii_lowercase(),
            &STYLE.to_ascii_lowercase(),
        ] {
            assert!(!asset.contains("http://"));
            assert!(!asset.contains("https://"));
            assert!(!asset.contains("@import"));
        }
    }

    #[test]
    fn the_script_renders_data_only_as_text() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!SCRIPT.contains(sink), "app.js uses {sink}");
        }
    }
}
