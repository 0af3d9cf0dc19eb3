//! `writ`: one binary for every part of Writ.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    let cli = match writ_txn_service::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // Bad usage: the one line that says what is wrong (`--help` has the rest).
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid usage"));
            return ExitCode::from(2);
        }
    };
    match writ_txn_service::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, the reason only: details go to the log.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
