//! `writ txn run`, `writ txn decode` and `writ exchange`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine;
use serde_json::Value;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::{ExchangeError, TxnClient, TxnRequest};
use writ_sdk::oauth::TokenType;
use writ_sdk::workload::X509Source;

use writ_identity::server::config::toml_error_line;
use writ_txn_service::config::{TxnConfig, TxnFileConfig, TxnServer};

use super::api::{AgentSocket, explain_no_identity};
use super::out::{self, Output, OutputArg, errln, outln};
use super::server::{LogFormat, init_logging};

/// Largest token read from a file or standard input.
const MAX_TOKEN_INPUT: u64 = 64 * 1024;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TxnCommand {
    /// Run the transaction token service until Ctrl-C.
    Run {
        /// Path to txn.toml.
        #[arg(long)]
        config: PathBuf,
        /// Log filter (`info`, `debug`, ...).
        #[arg(long, env = "WRIT_LOG", default_value = "info")]
        log_level: String,
        /// Log format: `text` (colour only on a terminal) or `json` (one object a line).
        #[arg(long, env = "WRIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Print a Txn-Token's header and claims, and its delegation chain as a tree.
    /// Decoding does not verify the signature.
    Decode {
        /// The token, `-` to read it from standard input, or `@file` to read it from a
        /// file.
        token: String,
        /// `json`: the header and claims as one JSON object.
        #[command(flatten)]
        output: OutputArg,
        /// Same as `--output json` (kept for earlier scripts).
        #[arg(long, hide = true)]
        json: bool,
    },
    /// Revoke a transaction, a user, a workload or a sub-agent lease (the kill switch):
    /// every token service replica refuses it at once, verifiers and agents follow.
    Revoke(super::revoke::RevokeArgs),
    /// List the revocations in force and when each lapses.
    Revocations(super::revoke::RevocationsArgs),
}

/// `writ exchange`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExchangeArgs {
    #[command(flatten)]
    socket: AgentSocket,
    /// File holding the subject token (`@file` works too), or `-` for standard input.
    /// Never the token itself: a command line is visible to every user of the machine.
    #[arg(long, value_name = "FILE|-")]
    subject_token: String,
    /// Subject token type: access_token, id_token, jwt or txn_token (or a full URN).
    #[arg(long, default_value = "access_token")]
    subject_token_type: TokenType,
    /// Space-separated scopes to ask for (default: the subject token's).
    #[arg(long)]
    scope: Option<String>,
    /// JSON object that becomes the token's `tctx`.
    #[arg(long)]
    request_details: Option<String>,
    /// JSON object added to the token's `rctx`.
    #[arg(long)]
    request_context: Option<String>,
    /// The service's base URL.
    #[arg(long, env = "WRIT_TXN_URL", default_value = "https://127.0.0.1:8443")]
    url: String,
    /// Present this SVID when the agent issues several.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Accept only a service with this SPIFFE ID (default: any of the own trust domain).
    #[arg(long)]
    server_id: Option<String>,
    /// `json`: the whole token response (or the RFC 6749 error body) instead of the
    /// token.
    #[command(flatten)]
    output: OutputArg,
    /// Same as `--output json` (kept for earlier scripts).
    #[arg(long, hide = true)]
    json: bool,
}

pub(crate) async fn run(cmd: TxnCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TxnCommand::Run {
            config,
            log_level,
            log_format,
        } => {
            init_logging(&log_level, log_format)?;
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            let base = config.parent().unwrap_or(Path::new("."));
            let file: TxnFileConfig = toml::from_str(&text).map_err(|e| {
                let reason = toml_error_line(&e).unwrap_or_else(|| e.message().to_owned());
                anyhow::anyhow!("{}: {reason}", config.display())
            })?;
            let config = TxnConfig::from_file(file, base)?;
            let audit_to_stdout = config.audit_log.is_none();
            let server = TxnServer::start(config).await?;
            let stop = super::server::shutdown_signal();
            let ready = format!(
                "Transaction token service listening on https://{}",
                server.addr
            );
            if audit_to_stdout {
                // Standard output carries only the audit log's JSON lines.
                errln!("{ready}");
            } else {
                // Whoever started it may stop reading standard output; that must not stop it.
                let _ = outln!("{ready}");
            }
            stop.await;
            server.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }
        TxnCommand::Decode {
            token,
            output,
            json,
        } => {
            let token = if token == "-" || token.starts_with('@') {
                read_token("the token", &token)?
            } else {
                token.trim().to_owned()
            };
            decode(&token, json || output.output == Output::Json)
        }
        TxnCommand::Revoke(args) => super::revoke::revoke(args).await,
        TxnCommand::Revocations(args) => super::revoke::revocations(args).await,
    }
}

pub(crate) async fn exchange(args: ExchangeArgs) -> anyhow::Result<ExitCode> {
    let json = args.json || args.output.output == Output::Json;
    let token = read_token("--subject-token", &args.subject_token)?;
    let mut builder = X509Source::builder().endpoint(args.socket.endpoint.clone());
    if let Some(id) = &args.spiffe_id {
        builder = builder.spiffe_id(SpiffeId::new(id).context("--spiffe-id")?);
    }
    let source = builder
        .build()
        .await
        .map_err(|e| explain_no_identity(e.into()))?;
    let client = match &args.server_id {
        Some(id) => TxnClient::new(
            &source,
            &args.url,
            SpiffeId::new(id).context("--server-id")?,
        )?,
        // The command's documented default: without `--server-id`, any server SVID of
        // the own trust domain (the SDK offers this only as a dangerous option).
        None => TxnClient::builder(&source, &args.url)
            .dangerous()
            .accept_any_member_of(source.spiffe_id().trust_domain())?,
    };
    let mut request = TxnRequest::new(token, args.subject_token_type);
    if let Some(scope) = args.scope {
        request = request.scope(scope);
    }
    if let Some(details) = &args.request_details {
        request = request.request_details(json_arg("--request-details", details)?);
    }
    if let Some(context) = &args.request_context {
        request = request.request_context(json_arg("--request-context", context)?);
    }
    match client.exchange(request).await {
        Ok(issued) if json => {
            let body = serde_json::json!({
                "access_token": issued.access_token,
                "issued_token_type": issued.issued_token_type,
                "token_type": issued.token_type,
                "expires_in": issued.expires_in,
            });
            out::json(&body)?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(issued) => {
            outln!("{}", issued.access_token)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(ExchangeError::Refused {
            status,
            code,
            description,
            ..
        }) if json => {
            out::json(
                &serde_json::json!({"status": status, "error": code, "error_description": description}),
            )?;
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

fn json_arg(flag: &str, text: &str) -> anyhow::Result<Value> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("{flag} is not valid JSON"))?;
    anyhow::ensure!(value.is_object(), "{flag} must be a JSON object");
    Ok(value)
}

/// A token from a file (`path` or `@path`) or `-` (standard input), at most
/// [`MAX_TOKEN_INPUT`] bytes, for the flag `what`.
///
/// Never echoes `source` unless it names a file that exists: a user who pastes the token
/// itself where a file name belongs (`--subject-token "$(cat alice.jwt)"`) must not find
/// it in an error message, a terminal scrollback or a CI log.
pub(crate) fn read_token(what: &str, source: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    let read = if source == "-" {
        std::io::stdin()
            .take(MAX_TOKEN_INPUT + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("{what}: cannot read the token from standard input"))?
    } else {
        let path = source.strip_prefix('@').unwrap_or(source);
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || out::looks_like_jwt(path) => {
                anyhow::bail!(
                    "{what} takes a file name, `@file`, or `-` to read the token from \
                     standard input (no such file; the value is not shown, it may be a \
                     token), e.g. `writ dev login ... | writ exchange --subject-token -`"
                )
            }
            Err(e) => anyhow::bail!("{what}: cannot read {path}: {e}"),
        };
        file.take(MAX_TOKEN_INPUT + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("{what}: cannot read {path}"))?
    };
    anyhow::ensure!(
        read as u64 <= MAX_TOKEN_INPUT,
        "the token is larger than {MAX_TOKEN_INPUT} bytes"
    );
    let token = text.trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "the token is empty");
    Ok(token)
}

/// The header and claims of a compact JWS, unverified.
fn decode_parts(token: &str) -> anyhow::Result<(Value, Value)> {
    anyhow::ensure!(
        token.len() as u64 <= MAX_TOKEN_INPUT,
        "the token is larger than {MAX_TOKEN_INPUT} bytes"
    );
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        anyhow::bail!("not a JWT: expected three dot-separated parts");
    };
    let part = |name: &str, text: &str| -> anyhow::Result<Value> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .with_context(|| format!("the JWT {name} is not base64url"))?;
        let value: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("the JWT {name} is not JSON"))?;
        anyhow::ensure!(value.is_object(), "the JWT {name} is not a JSON object");
        Ok(value)
    };
    Ok((part("header", header)?, part("claims", claims)?))
}

fn decode(token: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (header, claims) = decode_parts(token)?;
    if json {
        out::json(&serde_json::json!({"header": header, "claims": claims}))?;
        return Ok(ExitCode::SUCCESS);
    }
    out::raw(&render(&header, &claims))?;
    Ok(ExitCode::SUCCESS)
}

/// The human form: header, claims, then the chain from the user down to the current
/// actor.
fn render(header: &Value, claims: &Value) -> String {
    let mut out = String::new();
    out.push_str("Header:\n");
    out.push_str(&indent(&pretty(header)));
    out.push_str("Claims:\n");
    out.push_str(&indent(&pretty(claims)));
    out.push_str("Delegation chain (first to current):\n");
    let user = claims.get("sub").and_then(Value::as_str).unwrap_or("?");
    out.push_str(&format!("  {user} (subject)\n"));
    let mut actors = Vec::new();
    let mut act = claims.get("act");
    while let Some(a) = act {
        actors.push(a.get("sub").and_then(Value::as_str).unwrap_or("?"));
        act = a.get("act");
    }
    let req_wl = claims.get("req_wl").and_then(Value::as_str);
    if actors.is_empty()
        && let Some(wl) = req_wl
    {
        actors.push(wl);
    }
    for (depth, actor) in actors.iter().rev().enumerate() {
        let marker = if depth + 1 == actors.len() {
            " (current actor)"
        } else {
            ""
        };
        out.push_str(&format!("  {}└─ {actor}{marker}\n", "   ".repeat(depth)));
    }
    out
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(header: &str, claims: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", e(header), e(claims))
    }

    #[test]
    fn chain_prints_first_to_current() {
        let token = jwt(
            r#"{"alg":"ES256","typ":"txntoken+jwt"}"#,
            r#"{"sub":"alice","req_wl":"spiffe://td/c","act":{"sub":"spiffe://td/c","act":{"sub":"spiffe://td/b","act":{"sub":"spiffe://td/a"}}}}"#,
        );
        let (h, c) = decode_parts(&token).unwrap();
        let text = render(&h, &c);
        let a = text.find("└─ spiffe://td/a").unwrap();
        let b = text.find("└─ spiffe://td/b").unwrap();
        let c = text.find("└─ spiffe://td/c (current actor)").unwrap();
        assert!(a < b && b < c, "{text}");
        assert!(text.contains("alice (subject)"));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(decode_parts("a.b").is_err());
        assert!(decode_parts("a.b.c.d").is_err());
        assert!(decode_parts("!!!.e30.x").is_err());
        assert!(decode_parts(&jwt("[]", "{}")).is_err());
        assert!(decode_parts(&jwt("{}", "not json")).is_err());
        assert!(decode_parts(&"a".repeat(70_000)).is_err());
    }
}
