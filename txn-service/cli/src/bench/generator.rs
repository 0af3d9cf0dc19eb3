//! A load generator in its own process: this executable run as
//! `writ bench <bench> --generator`, spoken to in JSON lines over its standard input
//! and output (errors go to the shared standard error).
//!
//! Both sides are here: [`Generator`] is the serving process's handle on the child, and
//! [`read_line`] / [`say`] are what the child uses to read its requests and answer.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Longest a generator may take to start and warm up.
pub const READY: Duration = Duration::from_secs(60);

/// The serving process's handle on a generator process; killed when dropped.
pub struct Generator {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Generator {
    /// Starts `writ bench <bench> --generator`.
    ///
    /// # Errors
    /// This executable cannot be found or started.
    pub fn spawn(bench: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("this executable")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["bench", bench, "--generator"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load generator process")?;
        let stdin = child.stdin.take().context("the generator's stdin")?;
        let stdout = child.stdout.take().context("the generator's stdout")?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Sends one line (without its newline).
    ///
    /// # Errors
    /// The generator has gone.
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next line the generator prints, waiting at most `within`.
    ///
    /// # Errors
    /// Nothing came in time, or the generator ended (its error is on standard error).
    pub async fn receive(&mut self, within: Duration) -> anyhow::Result<String> {
        tokio::time::timeout(within, self.lines.next_line())
            .await
            .context("the load generator did not answer in time")??
            .context("the load generator failed (see its error above)")
    }

    /// Closes its input and waits for it to exit.
    ///
    /// # Errors
    /// It exited with a failure.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        drop(self.stdin);
        let status = self.child.wait().await?;
        anyhow::ensure!(status.success(), "the load generator exited with {status}");
        Ok(())
    }
}

/// In the generator: one line of standard input (at most `max` bytes), read off the
/// runtime's threads; `None` at the end of the input.
///
/// # Errors
/// Standard input cannot be read, or ends in the middle of a line.
pub async fn read_line(max: u64) -> anyhow::Result<Option<String>> {
    tokio::task::spawn_blocking(move || {
        use std::io::{BufRead as _, Read as _};
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .take(max)
            .read_line(&mut line)
            .context("standard input")?;
        if line.is_empty() {
            return Ok(None);
        }
        anyhow::ensure!(line.ends_with('\n'), "no complete line on standard input");
        line.pop();
        Ok(Some(line))
    })
    .await
    .context("reading standard input")?
}

/// In the generator: prints one line to standard output.
///
/// # Errors
/// Standard output is closed.
pub fn say(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(line.as_bytes())?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}
