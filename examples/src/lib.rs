//! Writ example programs live in `src/bin/`.
#![forbid(unsafe_code)]
