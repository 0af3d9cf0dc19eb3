//! What the CLI prints: standard output through `outln!`, which turns a closed pipe
//! (`writ entry list | head -3`) into `StdoutClosed` so the command ends quietly with
//! exit 0 instead of panicking as `println!` does; the `--output text|json` flag every
//! command that prints data takes; and what `main` does with errors (secrets redacted,
//! causes not repeated).
//!
//! Why not reset SIGPIPE to its default at start, as many Rust CLIs do: the same binary
//! runs the server, the agent and the token service, which write to Unix sockets with
//! plain `write(2)`; with the default disposition a peer that hangs up would kill the
//! whole server. Handling `BrokenPipe` where standard output is written keeps the
//! signal ignored everywhere else.

use std::io::Write as _;

/// Standard output was closed by its reader (`EPIPE`): the command stops printing and
/// exits 0 without a message, as a well-behaved filter does.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
pub(crate) struct StdoutClosed;

/// Writes one line to standard output; a closed pipe becomes [`StdoutClosed`].
///
/// # Errors
/// [`StdoutClosed`], or the write error naming standard output.
pub(crate) fn line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush())
        .map_err(stdout_error)
}

/// Writes `text` as is (no newline added) to standard output.
///
/// # Errors
/// As [`line`].
pub(crate) fn raw(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(stdout_error)
}

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::anyhow!("cannot write to standard output: {e}")
    }
}

/// `println!` that returns an error instead of panicking: `outln!("...")?;`.
macro_rules! outln {
    () => {
        $crate::cli::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// A line to standard error; a closed standard error is ignored (never a panic, as
/// `eprintln!` would).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use errln;

/// How a command prints its data: `--output text|json`, the same flag on every command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    #[default]
    #[value(alias = "pretty")]
    Text,
    /// One JSON document on standard output: an object for one thing, an array for a
    /// list (also when it holds 0 or 1 items).
    Json,
}

/// The `--output` flag, flattened into each command that prints data.
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct OutputArg {
    /// Output format: `text` for people, `json` for scripts (a list is always an array).
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: Output,
}

impl OutputArg {
    /// True for `--output json`.
    pub(crate) fn json(self) -> bool {
        self.output == Output::Json
    }
}

/// Prints one JSON document, pretty, on standard output.
///
/// # Errors
/// As [`line`].
pub(crate) fn json(value: &serde_json::Value) -> anyhow::Result<()> {
    line(format_args!("{value:#}"))
}

/// Flags whose value is a secret: never echoed in an error.
const SECRET_FLAGS: &[&str] = &["--subject-token", "--svid", "--join-token", "--token"];

/// The command-line values that must never appear in an error: the values of
/// `SECRET_FLAGS` and anything shaped like a JWT (three base64url parts), such as a
/// token pasted where a file name was expected.
pub fn secrets_in(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut next_is_secret = false;
    for arg in args {
        if next_is_secret {
            next_is_secret = false;
            push_secret(&mut out, arg);
            continue;
        }
        if let Some((flag, value)) = arg.split_once('=')
            && SECRET_FLAGS.contains(&flag)
        {
            push_secret(&mut out, value);
        } else if SECRET_FLAGS.contains(&arg.as_str()) {
            next_is_secret = true;
        } else if looks_like_jwt(arg) {
            push_secret(&mut out, arg);
        }
    }
    // Longest first, so a secret that contains another is replaced whole.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

fn push_secret(out: &mut Vec<String>, value: &str) {
    // `-` and `@file` name where the secret is, not the secret; very short values would
    // redact ordinary words.
    if value != "-" && !value.starts_with('@') && value.len() >= 8 {
        out.push(value.to_owned());
    }
}

/// Three non-empty base64url parts separated by dots (a compact JWS), or more for JWE.
pub(crate) fn looks_like_jwt(text: &str) -> bool {
    let parts: Vec<&str> = text.trim().split('.').collect();
    text.len() >= 20
        && (parts.len() == 3 || parts.len() == 5)
        && parts.iter().take(2).all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `text` with every secret replaced by `<redacted>`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for s in secrets {
        text = text.replace(s.as_str(), "<redacted>");
    }
    text
}

/// An error chain on one line, each cause once: a cause whose text the message above it
/// already contains (`#[error("datastore: {0}")]` with `#[from]`) is not repeated.
pub fn chain_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg.replace('\n', " ")
}

/// True if the command stopped because standard output was closed.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("datastore: {0}")]
        struct Outer(#[from] std::io::Error);
        let inner = std::io::Error::other("disk full");
        let e = anyhow::Error::new(Outer::from(inner)).context("cannot start");
        assert_eq!(chain_line(&e), "cannot start: datastore: disk full");
        let plain = anyhow::anyhow!("a").context("b");
        assert_eq!(chain_line(&plain), "b: a");
    }

    #[test]
    fn secrets_are_found_and_redacted() {
        let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl";
        let args: Vec<String> = [
            "writ",
            "exchange",
            "--subject-token",
            "opaque-secret-value",
            "--join-token=abcdefgh-1234",
            jwt,
            "--svid",
            "-",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let secrets = secrets_in(&args);
        let text = redact(
            &format!("bad opaque-secret-value, abcdefgh-1234 and '{jwt}'"),
            &secrets,
        );
        assert_eq!(text, "bad <redacted>, <redacted> and '<redacted>'");
        assert!(!looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("spiffe://example.org/a.b.c"));
    }
}
