//! `writ`: one binary for every part of Writ.
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use writ_cli::cli::out;

fn main() -> ExitCode {
    // Started under a demo role's name (a copy `writ demo` staged): run that role.
    if let Some(role) = writ_cli::dev::demo::role_of_program(std::env::args_os().next()) {
        return role();
    }
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // Values that must never be echoed (tokens), whatever fails.
    let secrets = out::secrets_in(&args);
    let cli = match writ_cli::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            // clap colours only on a terminal; a closed pipe ends it quietly.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        Err(e) => {
            // Bad usage: clap's whole message, with its suggestions (`a similar argument
            // exists`, the possible values), but never a secret it would echo.
            let color = std::io::stderr().is_terminal() && !no_color();
            let text = if color {
                e.render().ansi().to_string()
            } else {
                e.render().to_string()
            };
            let _ = write!(std::io::stderr(), "{}", out::redact(&text, &secrets));
            return ExitCode::from(2);
        }
    };
    match writ_cli::cli::run(cli) {
        Ok(code) => code,
        // `writ entry list | head -3`: the reader is gone, nothing more to say.
        Err(e) if out::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the reason only, each cause once: details go to the log.
            let msg = out::redact(&out::chain_line(&e), &secrets);
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `NO_COLOR` set to anything but the empty string (no-color.org).
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}
