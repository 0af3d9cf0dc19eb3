//! Processes as Linux shows them in `/proc`: the one line of `/proc/<pid>/stat` that
//! names a process across pid reuse (its start time) and tells whether it has stopped or
//! exited. The agent's attestors and the SDK's sub-agent spawner read it the same way.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Most bytes read from `/proc/<pid>/stat`.
pub const MAX_STAT_BYTES: u64 = 8 * 1024;
/// `ESRCH`: reading a `/proc/<pid>` file after the process exited.
const ESRCH: i32 = 3;

/// Why a process could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// The pid is not a positive number, so it names no process.
    #[error("pid {pid} is not a valid process id")]
    InvalidPid {
        /// The pid given.
        pid: i32,
    },
    /// The process exited.
    #[error("process {pid} exited")]
    ProcessGone {
        /// The pid of the process.
        pid: i32,
    },
    /// `/proc/<pid>/stat` is not in the kernel's format.
    #[error("malformed /proc stat line: {reason}")]
    MalformedStat {
        /// What was wrong.
        reason: &'static str,
    },
    /// A file was larger than the limit for that file.
    #[error("{path} is larger than {max} bytes")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// The limit, in bytes.
        max: u64,
    },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error from the operating system.
        #[source]
        source: io::Error,
    },
}

/// What attestation needs from one `/proc/<pid>/stat` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcStat {
    pid: i32,
    state: u8,
    ppid: i32,
    start_time: u64,
}

impl ProcStat {
    /// Field 1: the process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Field 3: the state letter (`R`, `S`, `T` stopped, `Z` zombie, ...).
    pub fn state(&self) -> char {
        char::from(self.state)
    }

    /// Whether the process has exited (a zombie or dead): it only awaits its reaping.
    pub fn is_exited(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }

    /// Whether the process is stopped by a signal (`T`).
    pub fn is_stopped(&self) -> bool {
        self.state == b'T'
    }

    /// Field 4: the parent's process id (0 for the first process of a pid namespace).
    pub fn ppid(&self) -> i32 {
        self.ppid
    }

    /// Field 22: when the process started, in clock ticks since boot.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }
}

/// Parses a `/proc/<pid>/stat` line: `pid (comm) state ppid ... starttime ...`.
///
/// The command name is chosen by the process and may hold spaces, parentheses and any
/// other byte, so the fields after it are found from the *last* `)`.
///
/// # Errors
/// [`ProcError::MalformedStat`] when the line is not in that form.
pub fn parse_stat(stat: &[u8]) -> Result<ProcStat, ProcError> {
    let malformed = |reason| ProcError::MalformedStat { reason };
    let open = stat
        .iter()
        .position(|&b| b == b'(')
        .ok_or(malformed("no '(' before the command name"))?;
    let close = stat
        .iter()
        .rposition(|&b| b == b')')
        .ok_or(malformed("no ')' after the command name"))?;
    if close < open {
        return Err(malformed("')' before '('"));
    }
    let pid = stat
        .get(..open)
        .and_then(|head| head.strip_suffix(b" "))
        .and_then(parse_decimal)
        .and_then(|pid| i32::try_from(pid).ok())
        .filter(|&pid| pid > 0)
        .ok_or(malformed("field 1 (pid) is not a process id"))?;
    let rest = stat
        .get(close.saturating_add(1)..)
        .and_then(|rest| rest.strip_prefix(b" "))
        .ok_or(malformed("no space after the command name"))?;
    let rest = std::str::from_utf8(rest).map_err(|_| malformed("non-UTF-8 after the command"))?;
    let mut fields = rest.split_ascii_whitespace();
    // Field 3, the state: one letter.
    let state = fields
        .next()
        .filter(|state| state.len() == 1)
        .and_then(|state| state.bytes().next())
        .ok_or(malformed("field 3 (state) is missing"))?;
    let ppid = fields
        .next()
        .and_then(|f| parse_decimal(f.as_bytes()))
        .and_then(|ppid| i32::try_from(ppid).ok())
        .ok_or(malformed("field 4 (ppid) is not a process id"))?;
    // Fields 5..=21 are skipped; `nth(17)` is field 22.
    let start_time = fields
        .nth(17)
        .and_then(|f| parse_decimal(f.as_bytes()))
        .ok_or(malformed("field 22 (starttime) is not a number"))?;
    Ok(ProcStat {
        pid,
        state,
        ppid,
        start_time,
    })
}

/// Reads and parses `<proc_root>/<pid>/stat`. Blocking.
///
/// # Errors
/// [`ProcError::InvalidPid`] for `pid <= 0`, [`ProcError::ProcessGone`] if there is
/// no such process, [`ProcError::MalformedStat`], or the I/O error.
pub fn read_stat(proc_root: &Path, pid: i32) -> Result<ProcStat, ProcError> {
    if pid <= 0 {
        return Err(ProcError::InvalidPid { pid });
    }
    let path = proc_root.join(pid.to_string()).join("stat");
    let bytes = read_bounded(&path, MAX_STAT_BYTES).map_err(|e| match e {
        ProcError::Io { source, .. } if process_is_gone(&source) => ProcError::ProcessGone { pid },
        other => other,
    })?;
    parse_stat(&bytes)
}

/// Whether an error from a `/proc/<pid>` path means that the process no longer exists.
pub fn process_is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(ESRCH)
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// The whole of `path`, if it holds at most `max` bytes. Blocking.
///
/// # Errors
/// [`ProcError::FileTooLarge`] past `max`, [`ProcError::Io`] on a read error.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ProcError> {
    let io_err = |source| ProcError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut buf = Vec::new();
    File::open(path)
        .map_err(io_err)?
        .take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    if u64::try_from(buf.len()).unwrap_or(u64::MAX) > max {
        return Err(ProcError::FileTooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(buf)
}
