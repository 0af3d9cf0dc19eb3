//! W3C Trace Context (`traceparent`, `tracestate`): one trace id carried from the first
//! hop of a transaction to the last, so a transaction's spans and its verification
//! records join up in any tracing backend.
//!
//! [`TraceContext`] parses and formats the headers with the version `00` rules: lowercase
//! hex, a trace id and a parent id that are not all zeros, version `ff` refused, a future
//! version read for its first four fields. A `tracestate` that breaks the list rules or
//! the limits ([`MAX_TRACESTATE`] bytes, [`MAX_TRACESTATE_MEMBERS`] members) is dropped
//! and the `traceparent` kept, as the specification asks.
//!
//! Each hop continues the trace as a [`TraceContext::child`]: the same trace id, a new
//! parent id. The SDK's `TxnClient` sends `traceparent` on exchange requests that carry
//! one (`TxnRequest::trace`), `TxnLayer` reads it into `Verified::trace`, and
//! `Verified::forward` passes a child on. A process started for a request (a sub-agent)
//! gets it in the [`ENV`] variable.
//!
//! ```
//! use writ_sdk::trace::TraceContext;
//!
//! let incoming = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?;
//! let next = incoming.child();
//! assert_eq!(next.trace_id(), incoming.trace_id());
//! assert_ne!(next.parent_id(), incoming.parent_id());
//! assert!(next.sampled());
//! // All-zero ids, uppercase hex and version ff are refused.
//! assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_err());
//! assert!(TraceContext::parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_err());
//! # Ok::<(), writ_sdk::trace::TraceError>(())
//! ```

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header.
pub const TRACESTATE: &str = "tracestate";
/// The environment variable that hands a `traceparent` to a process started for a
/// request (as OpenTelemetry's environment carrier names it).
pub const ENV: &str = "TRACEPARENT";
/// The environment variable that hands a `tracestate` to such a process.
pub const ENV_STATE: &str = "TRACESTATE";
/// Longest `traceparent` read (a future version may append fields).
pub const MAX_TRACEPARENT: usize = 256;
/// Longest `tracestate` kept, bytes (the specification's propagation minimum).
pub const MAX_TRACESTATE: usize = 512;
/// Most `tracestate` list members kept.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Length of a version `00` `traceparent`.
const VERSION_00_LEN: usize = 55;

/// Why a `traceparent` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// Longer than [`MAX_TRACEPARENT`].
    #[error("traceparent is longer than {MAX_TRACEPARENT} bytes")]
    TooLong,
    /// Not `version-traceid-parentid-flags` in lowercase hex of the right lengths.
    #[error("traceparent is not version-traceid-parentid-flags in lowercase hex")]
    Malformed,
    /// Version `ff`, which the specification forbids.
    #[error("traceparent version ff is invalid")]
    InvalidVersion,
    /// A trace id of all zeros.
    #[error("traceparent trace id is all zeros")]
    ZeroTraceId,
    /// A parent id of all zeros.
    #[error("traceparent parent id is all zeros")]
    ZeroParentId,
}

/// One position in a distributed trace: the `traceparent` fields and the `tracestate`
/// carried with them.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
    state: Option<String>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("tracestate", &self.state)
            .finish()
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` header value (version `00`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

impl std::str::FromStr for TraceContext {
    type Err = TraceError;

    fn from_str(s: &str) -> Result<Self, TraceError> {
        Self::parse(s)
    }
}

impl TraceContext {
    /// Parses a `traceparent` header value.
    ///
    /// # Errors
    /// [`TraceError`] for anything the version `00` rules refuse.
    pub fn parse(traceparent: &str) -> Result<Self, TraceError> {
        let s = traceparent.trim_matches([' ', '\t']).as_bytes();
        if s.len() > MAX_TRACEPARENT {
            return Err(TraceError::TooLong);
        }
        let version = s
            .get(..2)
            .and_then(hex_bytes::<1>)
            .ok_or(TraceError::Malformed)?;
        match version {
            [0xff] => return Err(TraceError::InvalidVersion),
            // Version 00 is exactly 55 bytes; a later version may append `-...` fields.
            [0x00] if s.len() != VERSION_00_LEN => return Err(TraceError::Malformed),
            _ if s.len() < VERSION_00_LEN
                || (s.len() > VERSION_00_LEN && s.get(VERSION_00_LEN) != Some(&b'-')) =>
            {
                return Err(TraceError::Malformed);
            }
            _ => {}
        }
        let dashes = [2, 35, 52].iter().all(|&i| s.get(i) == Some(&b'-'));
        let trace_id = s.get(3..35).and_then(hex_bytes::<16>);
        let parent_id = s.get(36..52).and_then(hex_bytes::<8>);
        let flags = s.get(53..55).and_then(hex_bytes::<1>);
        let (Some(trace_id), Some(parent_id), Some([flags]), true) =
            (trace_id, parent_id, flags, dashes)
        else {
            return Err(TraceError::Malformed);
        };
        if trace_id == [0; 16] {
            return Err(TraceError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(TraceError::ZeroParentId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            // Only the sampled bit is defined for version 00; the others are not passed on.
            flags: flags & 0x01,
            state: None,
        })
    }

    /// Starts a new trace (random ids), sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: random(),
            parent_id: random(),
            flags: 0x01,
            state: None,
        }
    }

    /// The context a downstream call carries: the same trace id, flags and state, a new
    /// parent id.
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            parent_id: random(),
            ..self.clone()
        }
    }

    /// Attaches a `tracestate` header value; one that breaks the list rules or the
    /// limits is dropped (the `traceparent` stays valid without it).
    #[must_use]
    pub fn with_tracestate(mut self, tracestate: &str) -> Self {
        self.state = valid_tracestate(tracestate).then(|| tracestate.trim().to_owned());
        self
    }

    /// The context a process was started with ([`ENV`], [`ENV_STATE`]), if valid.
    pub fn from_env() -> Option<Self> {
        let parent = std::env::var(ENV).ok()?;
        let context = Self::parse(&parent).ok()?;
        Some(match std::env::var(ENV_STATE) {
            Ok(state) => context.with_tracestate(&state),
            Err(_) => context,
        })
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent (span) id, 16 lowercase hex digits.
    pub fn parent_id(&self) -> String {
        hex(&self.parent_id)
    }

    /// Whether the caller sampled the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 == 0x01
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        self.to_string()
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The headers that carry this context: `traceparent`, and `tracestate` if any.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        std::iter::once((TRACEPARENT, self.traceparent()))
            .chain(self.state.iter().map(|s| (TRACESTATE, s.clone())))
    }

    /// The environment variables that hand this context to a child process.
    pub fn env(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        std::iter::once((ENV, self.traceparent()))
            .chain(self.state.iter().map(|s| (ENV_STATE, s.clone())))
    }
}

/// With the `otel` feature: the bridge to OpenTelemetry contexts.
#[cfg(feature = "otel")]
impl TraceContext {
    /// An OpenTelemetry context whose remote parent is this trace position.
    pub fn to_otel(&self) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        };
        let state = self
            .state
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.parent_id),
            TraceFlags::new(self.flags),
            true,
            state,
        ))
    }

    /// The position of an OpenTelemetry context's span, if it has a valid one.
    pub fn from_otel(context: &opentelemetry::Context) -> Option<Self> {
        use opentelemetry::trace::TraceContextExt as _;
        let span = context.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        let context = Self {
            trace_id: sc.trace_id().to_bytes(),
            parent_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8() & 0x01,
            state: None,
        };
        Some(if state.is_empty() {
            context
        } else {
            context.with_tracestate(&state)
        })
    }

    /// The current `tracing` span's position in its OpenTelemetry trace, when a
    /// `tracing-opentelemetry` layer is installed and the span has a valid context: what
    /// an outgoing call should carry as its `traceparent`.
    pub fn current() -> Option<Self> {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        Self::from_otel(&tracing::Span::current().context())
    }
}

/// `tracestate`: at most [`MAX_TRACESTATE`] bytes and [`MAX_TRACESTATE_MEMBERS`]
/// members, each `key=value` with the specification's characters.
fn valid_tracestate(state: &str) -> bool {
    let state = state.trim_matches([' ', '\t']);
    if state.is_empty() || state.len() > MAX_TRACESTATE {
        return false;
    }
    let mut count = 0;
    for member in state.split(',') {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            // Empty list members are allowed and do not count.
            continue;
        }
        count += 1;
        let Some((key, value)) = member.split_once('=') else {
            return false;
        };
        let key_ok = (1..=256).contains(&key.len())
            && key
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/' | b'@'))
            && key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let value_ok = (1..=256).contains(&value.len())
            && value
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
            && !value.ends_with(' ');
        if !key_ok || !value_ok {
            return false;
        }
    }
    count <= MAX_TRACESTATE_MEMBERS
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `N` bytes from `2N` lowercase hex digits.
fn hex_bytes<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *byte = (digit(*hi)? << 4) | digit(*lo)?;
    }
    Some(out)
}

/// `N` random bytes, never all zeros. Trace ids need to be unpredictable enough not to
/// collide, not secret: std's randomly keyed SipHash over a process-wide counter gives
/// that without a random-number dependency.
fn random<const N: usize>() -> [u8; N] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; N];
    loop {
        for chunk in out.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            let bytes = hasher.finish().to_le_bytes();
            for (o, b) in chunk.iter_mut().zip(bytes) {
                *o = b;
            }
        }
        if out != [0; N] {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_and_children_keep_the_trace() {
        let tc = TraceContext::parse(GOOD).unwrap();
        assert_eq!(tc.traceparent(), GOOD);
        assert_eq!(tc.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tc.parent_id(), "00f067aa0ba902b7");
        assert!(tc.sampled());
        let child = tc.child();
        assert_eq!(child.trace_id(), tc.trace_id());
        assert_ne!(child.parent_id(), tc.parent_id());
        assert_eq!(TraceContext::parse(&child.traceparent()).unwrap(), child);
        let root = TraceContext::new_root();
        assert_ne!(root.trace_id(), TraceContext::new_root().trace_id());
        assert_eq!(TraceContext::parse(&root.to_string()).unwrap(), root);
        // Unsampled stays unsampled; unknown flag bits are not passed on.
        let unsampled = TraceContext::parse(&GOOD.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
        let odd = TraceContext::parse(&GOOD.replace("-01", "-ff")).unwrap();
        assert!(odd.traceparent().ends_with("-01"));
    }

    #[test]
    fn version_rules() {
        let future = format!("cc{}-what-comes-next", &GOOD[2..]);
        let tc = TraceContext::parse(&future).unwrap();
        assert_eq!(tc.traceparent(), GOOD);
        assert_eq!(
            TraceContext::parse(&format!("ff{}", &GOOD[2..])),
            Err(TraceError::InvalidVersion)
        );
        // Version 00 has no extra fields; a future version's extra fields start with '-'.
        assert_eq!(
            TraceContext::parse(&format!("{GOOD}-x")),
            Err(TraceError::Malformed)
        );
        assert_eq!(
            TraceContext::parse(&format!("cc{}x", &GOOD[2..])),
            Err(TraceError::Malformed)
        );
        assert_eq!(
            TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Err(TraceError::ZeroTraceId)
        );
        assert_eq!(
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Err(TraceError::ZeroParentId)
        );
        assert_eq!(
            TraceContext::parse(&"0".repeat(MAX_TRACEPARENT + 1)),
            Err(TraceError::TooLong)
        );
    }

    #[test]
    fn garbage_is_refused() {
        let bad = [
            "",
            "00",
            "hello",
            &GOOD.to_uppercase(),
            &GOOD.replace('-', "_"),
            &GOOD.replacen("4b", "4g", 1),
            &GOOD[..54],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert!(TraceContext::parse(b).is_err(), "{b:?}");
        }
        // Every byte string of the right length that parses formats back to itself
        // (version 00, sampled bit only): a cheap property over mutations of GOOD.
        for i in 0..GOOD.len() {
            for c in [b'0', b'f', b'-', b'z', b'A', 0xff] {
                let mut bytes = GOOD.as_bytes().to_vec();
                bytes[i] = c;
                let Ok(text) = String::from_utf8(bytes) else {
                    continue;
                };
                if let Ok(tc) = TraceContext::parse(&text) {
                    let again = TraceContext::parse(&tc.traceparent()).unwrap();
                    assert_eq!(again, tc, "{text}");
                    assert_eq!(tc.trace_id().len(), 32);
                }
            }
        }
    }

    #[test]
    fn tracestate_limits() {
        let tc = TraceContext::parse(GOOD).unwrap();
        let kept = tc
            .clone()
            .with_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
        assert_eq!(
            kept.tracestate(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(kept.child().tracestate(), kept.tracestate());
        let headers: Vec<_> = kept.headers().collect();
        assert_eq!(headers.len(), 2);
        for bad in [
            "novalue",
            "UPPER=x",
            "k=v,=x",
            "k=a,b",
            "k=a\tb",
            &"k=v,".repeat(MAX_TRACESTATE_MEMBERS + 1),
            &format!("k={}", "v".repeat(MAX_TRACESTATE)),
        ] {
            assert_eq!(
                tc.clone().with_tracestate(bad).tracestate(),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(tc.headers().count(), 1);
    }
}

#[cfg(all(test, feature = "otel"))]
mod otel_tests {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn spans_join_the_incoming_trace_and_calls_carry_the_current_span() {
        let incoming =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .unwrap()
                .with_tracestate("writ=gw");
        assert_eq!(
            TraceContext::from_otel(&incoming.to_otel()),
            Some(incoming.clone())
        );

        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("writ-sdk-test")));
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(TraceContext::current(), None, "no span, no context");
            let span = tracing::info_span!("txn_request");
            span.set_parent(incoming.to_otel()).unwrap();
            let _entered = span.enter();
            let current = TraceContext::current().unwrap();
            assert_eq!(current.trace_id(), incoming.trace_id());
            assert_ne!(current.parent_id(), incoming.parent_id());
            assert_eq!(current.tracestate(), Some("writ=gw"));
            // A span inside it is another position in the same trace.
            let inner = tracing::info_span!("call");
            let _inner = inner.enter();
            let deeper = TraceContext::current().unwrap();
            assert_eq!(deeper.trace_id(), incoming.trace_id());
            assert_ne!(deeper.parent_id(), current.parent_id());
        });
    }
}
