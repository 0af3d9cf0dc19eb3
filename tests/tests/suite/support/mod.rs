//! What several parts of this package's tests and benches share beyond the `writ-tests`
//! library (which the suites of other packages use as well).

pub(crate) mod hostage;
