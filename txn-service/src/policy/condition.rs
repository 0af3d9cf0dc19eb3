//! CEL conditions on issuance rules: `condition = '...'` in a `[[caller]]` rule.
//!
//! A condition is a [CEL](https://github.com/google/cel-spec) expression (evaluated by
//! the `cel` crate) over the exchange at hand. A rule whose caller matcher accepts the
//! caller applies only when its condition is `true`; when it is `false` the next rule is
//! tried (first match still wins). A result that is not a bool, or an evaluation error
//! (a missing key, a type mismatch, an overflow, an input over the limits), refuses the
//! exchange: it never falls through to a more generous rule.
//!
//! Variables (every other name is refused when the policy loads):
//!
//! | name | CEL type | value |
//! |---|---|---|
//! | `caller` | map | `id` (the caller's SPIFFE ID), `trust_domain`, `path` |
//! | `subject` | map | the subject token's verified claims (OIDC token, or the replaced Txn-Token) |
//! | `request` | map | `scope` (list of strings: the requested scope), `audience`, `subject_token_type` (`access_token`, `id_token`, `jwt`, `txn_token`, `self_signed`, `unsigned_json`) |
//! | `tctx` | map | the transaction context the token will carry (`{}` when none) |
//! | `rctx` | map | the requester context the token will carry |
//! | `lease` | map or `null` | a sub-agent's lease: `id`, `parent`, `task`, `depth`, `created_at`, `expires_at` (Unix seconds); `null` for other callers |
//! | `now` | int | the service clock, Unix seconds |
//!
//! Limits, checked when the policy loads ([`ConditionError`] names what is wrong): at
//! most [`MAX_CONDITION_BYTES`] of text, [`MAX_NESTING`] levels of parser recursion,
//! [`MAX_NODES`] nodes and [`MAX_DEPTH`] levels once macros are expanded, at most
//! [`MAX_COMPREHENSION_NESTING`] nested comprehensions (`all`, `exists`, `exists_one`,
//! `map`, `filter`), only the standard functions (no extensions, no timestamps), and an
//! estimated worst-case cost of at most [`MAX_COST`] steps, counting every list or map
//! an input may hold as [`MAX_INPUT_ENTRIES`] long. The inputs are bounded when each
//! exchange converts them: at most [`MAX_INPUT_VALUES`] values in all, lists and maps of
//! at most [`MAX_INPUT_ENTRIES`] entries, strings of at most [`MAX_INPUT_STRING_BYTES`],
//! nested at most [`MAX_INPUT_DEPTH`] deep; more refuses the exchange. So no expression
//! that loads can loop for long or build large values.
//!
//! ```
//! use writ_txn_service::policy::condition::{Condition, Input};
//! use writ_identity::spiffe_id::SpiffeId;
//!
//! let condition = Condition::new(r#"caller.path.startsWith("/agents/") && now < 2000000000"#)
//!     .unwrap();
//! let mut input = Input::new(1_700_000_000);
//! input.caller(&SpiffeId::new("spiffe://example.org/agents/planner").unwrap());
//! assert_eq!(condition.evaluate(&input), Ok(true));
//! assert!(Condition::new("size(caller.id)").is_err()); // an int, not a bool
//! assert!(Condition::new("user.admin").is_err()); // unknown variable
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, Value as CelValue};
use serde_json::Value;
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::LeaseRecord;
use writ_sdk::oauth::TokenType;

/// Longest condition text, in bytes.
pub const MAX_CONDITION_BYTES: usize = 1024;
/// Deepest parser recursion (parentheses, brackets, unary operators...).
pub const MAX_NESTING: u16 = 32;
/// Most expression nodes once the macros are expanded.
pub const MAX_NODES: usize = 256;
/// Deepest expression tree once the macros are expanded.
pub const MAX_DEPTH: usize = 48;
/// Most comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) nested in the
/// loop of another (1: a comprehension inside a comprehension is allowed, not deeper).
pub const MAX_COMPREHENSION_NESTING: usize = 2;
/// Largest estimated worst-case cost (evaluation steps) of a condition.
pub const MAX_COST: u64 = 100_000;
/// Most entries of one list or map in the inputs.
pub const MAX_INPUT_ENTRIES: usize = 1024;
/// Most values (scalars, lists and maps) in all the inputs of one evaluation.
pub const MAX_INPUT_VALUES: usize = 8192;
/// Longest string (or map key) in the inputs, in bytes.
pub const MAX_INPUT_STRING_BYTES: usize = 4096;
/// Deepest nesting of lists and maps in one input.
pub const MAX_INPUT_DEPTH: usize = 16;

/// The variables a condition may name.
pub const VARIABLES: &[&str] = &[
    "caller", "subject", "request", "tctx", "rctx", "lease", "now",
];

/// Cost of one step: any node.
const STEP: u64 = 1;
/// Extra cost of `+` (it may copy a string or list).
const CONCAT: u64 = 8;
/// Extra cost of `matches` (it compiles its regular expression at each call).
const REGEX: u64 = 100;

/// The standard functions and operators a condition may call (the CEL standard
/// definitions less timestamps, durations and optionals).
const FUNCTIONS: &[&str] = &[
    operators::CONDITIONAL,
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::SUBSTRACT,
    operators::ADD,
    operators::MULTIPLY,
    operators::DIVIDE,
    operators::MODULO,
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::GREATER_EQUALS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::LESS,
    operators::NEGATE,
    operators::INDEX,
    operators::IN,
    operators::NOT_STRICTLY_FALSE,
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "string",
    "int",
    "uint",
    "double",
    "bytes",
    "bool",
    "dyn",
    "type",
];

/// Names of types a condition may use as values (`type(x) == string`).
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "list",
    "map",
    "null_type",
    "type",
];

/// Functions that return a bool.
const BOOL_FUNCTIONS: &[&str] = &[
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::GREATER_EQUALS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::LESS,
    operators::IN,
    operators::NOT_STRICTLY_FALSE,
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "bool",
];

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// Why a condition was refused when the policy loads, or why an evaluation denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConditionError {
    /// Over a size limit: the text, its nesting, its nodes or comprehensions.
    #[error("condition is too large: {0}")]
    TooLarge(String),
    /// The text is not CEL.
    #[error("condition does not compile: {0}")]
    Syntax(String),
    /// A name that is not one of [`VARIABLES`].
    #[error("condition names unknown variable `{name}` (known: {known})", known = VARIABLES.join(", "))]
    UnknownVariable {
        /// The name as written.
        name: String,
    },
    /// A function that is not a standard one.
    #[error("condition calls unknown or unsupported function `{name}`")]
    UnknownFunction {
        /// The name as written.
        name: String,
    },
    /// The expression's result cannot be a bool.
    #[error("condition must be a bool; it is {found}")]
    NotBool {
        /// The type it is, or the value it evaluated to.
        found: String,
    },
    /// The worst-case cost estimate is over [`MAX_COST`].
    #[error(
        "condition may cost up to {cost} steps (limit {MAX_COST}, counting each input list as {MAX_INPUT_ENTRIES} long): nest fewer loops"
    )]
    TooCostly {
        /// The estimate.
        cost: u64,
    },
    /// An input is over a limit (evaluation refused).
    #[error("condition input is too large: {0}")]
    Input(String),
    /// The evaluation failed (a missing key, a type mismatch, an overflow...).
    #[error("condition evaluation failed: {0}")]
    Evaluation(String),
}

/// A checked condition, ready to evaluate.
#[derive(Clone)]
pub struct Condition {
    source: Arc<str>,
    expr: Arc<IdedExpr>,
    cost: u64,
    reads: Arc<[&'static str]>,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Condition {
    /// Parses and checks `source` (see the module documentation for the limits).
    ///
    /// # Errors
    /// [`ConditionError`] for the first problem found.
    pub fn new(source: &str) -> Result<Self, ConditionError> {
        if source.len() > MAX_CONDITION_BYTES {
            return Err(ConditionError::TooLarge(format!(
                "{} bytes (limit {MAX_CONDITION_BYTES})",
                source.len()
            )));
        }
        if source.trim().is_empty() {
            return Err(ConditionError::Syntax("the expression is empty".into()));
        }
        let parser = ENV.parser().max_recursion_depth(MAX_NESTING);
        // The parser is third-party code fed operator text: a panic is a refusal.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parser.parse(source)))
                .map_err(|_| ConditionError::Syntax("the parser failed on this text".into()))?;
        let expr = parsed.map_err(|e| {
            let text = e.to_string();
            if text.to_ascii_lowercase().contains("recursion limit") {
                ConditionError::TooLarge(format!("nested deeper than {MAX_NESTING} levels"))
            } else {
                ConditionError::Syntax(one_line(&text))
            }
        })?;
        let mut check = Check::default();
        check.walk(&expr, 0, 0)?;
        if check.nodes > MAX_NODES {
            return Err(ConditionError::TooLarge(format!(
                "{} nodes (limit {MAX_NODES})",
                check.nodes
            )));
        }
        let found = check.infer(&expr);
        if !matches!(found, Kind::Bool | Kind::Dyn) {
            return Err(ConditionError::NotBool {
                found: found.name().to_owned(),
            });
        }
        let longest = (MAX_INPUT_ENTRIES as u64)
            .saturating_mul(check.concats.saturating_add(1))
            .saturating_add(check.nodes as u64);
        let cost = Cost { longest }.cost(&expr);
        if cost > MAX_COST {
            return Err(ConditionError::TooCostly { cost });
        }
        Ok(Self {
            source: source.into(),
            expr: Arc::new(expr),
            cost,
            reads: check.reads.into_iter().collect(),
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The input variables (of [`VARIABLES`]) the expression reads: an [`Input`] needs
    /// only these (see [`Input::only`]).
    pub fn reads(&self) -> &[&'static str] {
        &self.reads
    }

    /// The worst-case cost estimate (at most [`MAX_COST`]).
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// Evaluates the condition over `input`: `Ok(true)` lets its rule apply.
    ///
    /// # Errors
    /// [`ConditionError::Input`] when an input was over a limit,
    /// [`ConditionError::NotBool`] or [`ConditionError::Evaluation`]: each refuses.
    pub fn evaluate(&self, input: &Input) -> Result<bool, ConditionError> {
        if let Some(e) = &input.error {
            return Err(e.clone());
        }
        let mut context = Context::with_env(ENV.clone());
        context.set_variable_resolver(input);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| context.resolve(&self.expr)))
                .map_err(|_| ConditionError::Evaluation("the interpreter failed".into()))?;
        match result {
            Ok(CelValue::Bool(b)) => Ok(b),
            Ok(other) => Err(ConditionError::NotBool {
                found: other.type_of().to_string(),
            }),
            Err(e) => Err(ConditionError::Evaluation(one_line(&e.to_string()))),
        }
    }
}

fn one_line(text: &str) -> String {
    let mut s: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The inputs of one evaluation, converted (and bounded) as they are set. A variable
/// left unset is `{}` (`lease`: `null`).
#[derive(Debug, Clone)]
pub struct Input {
    /// Converted once, read by reference at each evaluation.
    values: HashMap<&'static str, Box<dyn Val>>,
    budget: usize,
    error: Option<ConditionError>,
    /// `Some`: the variables worth converting; the others stay at their defaults.
    wanted: Option<BTreeSet<&'static str>>,
}

impl Input {
    /// Inputs at `now` (Unix seconds).
    pub fn new(now: i64) -> Self {
        let mut input = Self {
            values: HashMap::new(),
            budget: MAX_INPUT_VALUES,
            error: None,
            wanted: None,
        };
        for name in VARIABLES {
            let value = match *name {
                "lease" => CelValue::Null,
                "now" => CelValue::Int(now),
                _ => CelValue::Map(HashMap::<String, CelValue>::new().into()),
            };
            input.set(name, value);
        }
        input
    }

    /// Converts only the variables named in `names` (those the conditions to evaluate
    /// read, see [`Condition::reads`]); the setters of the others do nothing.
    pub fn only(&mut self, names: impl IntoIterator<Item = &'static str>) -> &mut Self {
        self.wanted = Some(names.into_iter().collect());
        self
    }

    /// Whether the variable `name` is converted (see [`Self::only`]): a caller can skip
    /// preparing what no condition reads.
    pub fn wants(&self, name: &str) -> bool {
        self.wanted.as_ref().is_none_or(|w| w.contains(name))
    }

    fn set(&mut self, name: &'static str, value: CelValue) {
        match Box::<dyn Val>::try_from(value) {
            Ok(v) => {
                self.values.insert(name, v);
            }
            Err(e) => self.error = Some(ConditionError::Input(format!("`{name}`: {e}"))),
        }
    }

    /// Sets `caller`.
    pub fn caller(&mut self, id: &SpiffeId) -> &mut Self {
        if !self.wants("caller") {
            return self;
        }
        let map = HashMap::from([
            ("id".to_owned(), CelValue::from(id.as_str())),
            (
                "trust_domain".to_owned(),
                CelValue::from(id.trust_domain_str()),
            ),
            ("path".to_owned(), CelValue::from(id.path())),
        ]);
        self.set("caller", CelValue::Map(map.into()));
        self
    }

    /// Sets `subject` from the subject token's claims (a JSON object).
    pub fn subject<'a>(
        &mut self,
        claims: impl IntoIterator<Item = (&'a String, &'a Value)>,
    ) -> &mut Self {
        self.json_map("subject", claims)
    }

    /// Sets `tctx`.
    pub fn tctx<'a>(
        &mut self,
        tctx: impl IntoIterator<Item = (&'a String, &'a Value)>,
    ) -> &mut Self {
        self.json_map("tctx", tctx)
    }

    /// Sets `rctx`.
    pub fn rctx<'a>(
        &mut self,
        rctx: impl IntoIterator<Item = (&'a String, &'a Value)>,
    ) -> &mut Self {
        self.json_map("rctx", rctx)
    }

    /// Sets `request`: the requested scope (`None`: not named), the audience and the
    /// subject token type.
    pub fn request(
        &mut self,
        scope: Option<&BTreeSet<String>>,
        audience: &str,
        subject_token_type: TokenType,
    ) -> &mut Self {
        if !self.wants("request") {
            return self;
        }
        let scope: Vec<CelValue> = scope
            .into_iter()
            .flatten()
            .map(|s| CelValue::from(s.as_str()))
            .collect();
        let map = HashMap::from([
            ("scope".to_owned(), CelValue::List(Arc::new(scope))),
            ("audience".to_owned(), CelValue::from(audience)),
            (
                "subject_token_type".to_owned(),
                CelValue::from(subject_token_type.name()),
            ),
        ]);
        self.set("request", CelValue::Map(map.into()));
        self
    }

    /// Sets `lease` (a sub-agent caller's lease).
    pub fn lease(&mut self, lease: &LeaseRecord) -> &mut Self {
        if !self.wants("lease") {
            return self;
        }
        let map = HashMap::from([
            ("id".to_owned(), CelValue::from(lease.id.as_str())),
            (
                "parent".to_owned(),
                CelValue::from(lease.parent_id.as_str()),
            ),
            ("task".to_owned(), CelValue::from(lease.task.as_str())),
            ("depth".to_owned(), CelValue::Int(i64::from(lease.depth))),
            ("created_at".to_owned(), CelValue::Int(lease.created_at)),
            ("expires_at".to_owned(), CelValue::Int(lease.expires_at)),
        ]);
        self.set("lease", CelValue::Map(map.into()));
        self
    }

    fn json_map<'a>(
        &mut self,
        name: &'static str,
        entries: impl IntoIterator<Item = (&'a String, &'a Value)>,
    ) -> &mut Self {
        if self.error.is_some() || !self.wants(name) {
            return self;
        }
        let mut map = HashMap::new();
        for (k, v) in entries {
            if map.len() >= MAX_INPUT_ENTRIES {
                self.error = Some(ConditionError::Input(format!(
                    "`{name}` has more than {MAX_INPUT_ENTRIES} entries"
                )));
                return self;
            }
            match self.convert(name, k).and_then(|_| self.json(name, v, 1)) {
                Ok(value) => {
                    map.insert(k.clone(), value);
                }
                Err(e) => {
                    self.error = Some(e);
                    return self;
                }
            }
        }
        self.set(name, CelValue::Map(map.into()));
        self
    }

    /// Checks a map key.
    fn convert(&mut self, name: &str, key: &str) -> Result<(), ConditionError> {
        if key.len() > MAX_INPUT_STRING_BYTES {
            return Err(ConditionError::Input(format!(
                "`{name}` has a key longer than {MAX_INPUT_STRING_BYTES} bytes"
            )));
        }
        Ok(())
    }

    fn json(
        &mut self,
        name: &str,
        value: &Value,
        depth: usize,
    ) -> Result<CelValue, ConditionError> {
        if self.budget == 0 {
            return Err(ConditionError::Input(format!(
                "more than {MAX_INPUT_VALUES} values in all"
            )));
        }
        self.budget -= 1;
        if depth > MAX_INPUT_DEPTH {
            return Err(ConditionError::Input(format!(
                "`{name}` is nested deeper than {MAX_INPUT_DEPTH} levels"
            )));
        }
        let too_long = || {
            ConditionError::Input(format!(
                "`{name}` has a list or map of more than {MAX_INPUT_ENTRIES} entries"
            ))
        };
        Ok(match value {
            Value::Null => CelValue::Null,
            Value::Bool(b) => CelValue::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => CelValue::Int(i),
                (None, Some(u), _) => CelValue::UInt(u),
                (None, None, Some(f)) => CelValue::Float(f),
                _ => CelValue::Null,
            },
            Value::String(s) => {
                if s.len() > MAX_INPUT_STRING_BYTES {
                    return Err(ConditionError::Input(format!(
                        "`{name}` has a string longer than {MAX_INPUT_STRING_BYTES} bytes"
                    )));
                }
                CelValue::from(s.as_str())
            }
            Value::Array(items) => {
                if items.len() > MAX_INPUT_ENTRIES {
                    return Err(too_long());
                }
                let list = items
                    .iter()
                    .map(|v| self.json(name, v, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                CelValue::List(Arc::new(list))
            }
            Value::Object(entries) => {
                if entries.len() > MAX_INPUT_ENTRIES {
                    return Err(too_long());
                }
                let mut map = HashMap::with_capacity(entries.len());
                for (k, v) in entries {
                    self.convert(name, k)?;
                    map.insert(k.clone(), self.json(name, v, depth + 1)?);
                }
                CelValue::Map(map.into())
            }
        })
    }
}

impl VariableResolver for Input {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        self.values
            .get(variable)
            .map(|v| CowVal::Borrowed(v.as_ref()))
    }
}

/// A static type, as far as the checker can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Null,
    List,
    Map,
    Type,
    Dyn,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Bool => "a bool",
            Self::Int => "an int",
            Self::Uint => "a uint",
            Self::Double => "a double",
            Self::String => "a string",
            Self::Bytes => "bytes",
            Self::Null => "null",
            Self::List => "a list",
            Self::Map => "a map",
            Self::Type => "a type",
            Self::Dyn => "dynamic",
        }
    }

    fn join(self, other: Self) -> Self {
        if self == other { self } else { Self::Dyn }
    }
}

/// The load-time checks: names, functions, sizes; then the result type.
#[derive(Default)]
struct Check {
    /// Comprehension variables in scope, innermost last, with the accumulator's kind.
    scope: Vec<(String, Kind)>,
    nodes: usize,
    concats: u64,
    /// The input variables the expression reads.
    reads: BTreeSet<&'static str>,
}

impl Check {
    fn walk(&mut self, e: &IdedExpr, depth: usize, loops: usize) -> Result<(), ConditionError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(ConditionError::TooLarge(format!(
                "more than {MAX_NODES} nodes"
            )));
        }
        if depth > MAX_DEPTH {
            return Err(ConditionError::TooLarge(format!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        let d = depth + 1;
        match &e.expr {
            Expr::Unspecified => Err(ConditionError::Syntax("an empty expression".into())),
            Expr::Literal(_) => Ok(()),
            Expr::Ident(name) => {
                if self.scope.iter().any(|(n, _)| n == name) {
                    Ok(())
                } else if let Some(var) = VARIABLES.iter().find(|v| **v == name.as_str()) {
                    self.reads.insert(var);
                    Ok(())
                } else if TYPE_NAMES.contains(&name.as_str()) {
                    Ok(())
                } else {
                    Err(ConditionError::UnknownVariable { name: name.clone() })
                }
            }
            Expr::Select(s) => self.walk(&s.operand, d, loops),
            Expr::Call(call) => {
                if !FUNCTIONS.contains(&call.func_name.as_str()) {
                    return Err(ConditionError::UnknownFunction {
                        name: call.func_name.clone(),
                    });
                }
                if call.func_name == operators::ADD {
                    self.concats += 1;
                }
                if let Some(t) = &call.target {
                    self.walk(t, d, loops)?;
                }
                call.args.iter().try_for_each(|a| self.walk(a, d, loops))
            }
            Expr::List(l) => l.elements.iter().try_for_each(|x| self.walk(x, d, loops)),
            Expr::Map(m) => m.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(me) => {
                    self.walk(&me.key, d, loops)?;
                    self.walk(&me.value, d, loops)
                }
                EntryExpr::StructField(_) => Err(ConditionError::Syntax(
                    "message literals are not supported".into(),
                )),
            }),
            Expr::Struct(_) => Err(ConditionError::Syntax(
                "message literals are not supported".into(),
            )),
            Expr::Comprehension(c) => {
                if loops + 1 > MAX_COMPREHENSION_NESTING {
                    return Err(ConditionError::TooLarge(format!(
                        "comprehensions (all, exists, exists_one, map, filter) nested deeper than {MAX_COMPREHENSION_NESTING}"
                    )));
                }
                self.walk(&c.iter_range, d, loops)?;
                self.walk(&c.accu_init, d, loops)?;
                let accu = self.infer(&c.accu_init);
                let pushed = 2 + usize::from(c.iter_var2.is_some());
                self.scope.push((c.iter_var.clone(), Kind::Dyn));
                if let Some(v) = &c.iter_var2 {
                    self.scope.push((v.clone(), Kind::Dyn));
                }
                self.scope.push((c.accu_var.clone(), accu));
                let inner = self
                    .walk(&c.loop_cond, d, loops + 1)
                    .and_then(|()| self.walk(&c.loop_step, d, loops + 1))
                    .and_then(|()| self.walk(&c.result, d, loops));
                self.scope.truncate(self.scope.len() - pushed);
                inner
            }
        }
    }

    fn infer(&mut self, e: &IdedExpr) -> Kind {
        match &e.expr {
            Expr::Literal(l) => match l {
                LiteralValue::Boolean(_) => Kind::Bool,
                LiteralValue::Int(_) => Kind::Int,
                LiteralValue::UInt(_) => Kind::Uint,
                LiteralValue::Double(_) => Kind::Double,
                LiteralValue::String(_) => Kind::String,
                LiteralValue::Bytes(_) => Kind::Bytes,
                LiteralValue::Null => Kind::Null,
            },
            Expr::Ident(name) => {
                if let Some((_, kind)) = self.scope.iter().rev().find(|(n, _)| n == name) {
                    *kind
                } else if name == "now" {
                    Kind::Int
                } else if TYPE_NAMES.contains(&name.as_str()) && !VARIABLES.contains(&name.as_str())
                {
                    Kind::Type
                } else {
                    Kind::Dyn
                }
            }
            Expr::Select(s) if s.test => Kind::Bool,
            Expr::Select(_) | Expr::Unspecified | Expr::Struct(_) => Kind::Dyn,
            Expr::List(_) => Kind::List,
            Expr::Map(_) => Kind::Map,
            Expr::Comprehension(c) => {
                let accu = self.infer(&c.accu_init);
                self.scope.push((c.accu_var.clone(), accu));
                let kind = self.infer(&c.result);
                self.scope.pop();
                kind
            }
            Expr::Call(call) => {
                let name = call.func_name.as_str();
                if BOOL_FUNCTIONS.contains(&name) {
                    return Kind::Bool;
                }
                match name {
                    "size" | "int" => Kind::Int,
                    "uint" => Kind::Uint,
                    "double" => Kind::Double,
                    "string" => Kind::String,
                    "bytes" => Kind::Bytes,
                    "type" => Kind::Type,
                    operators::CONDITIONAL => match call.args.as_slice() {
                        [_, a, b] => {
                            let a = self.infer(a);
                            let b = self.infer(b);
                            a.join(b)
                        }
                        _ => Kind::Dyn,
                    },
                    operators::ADD
                    | operators::SUBSTRACT
                    | operators::MULTIPLY
                    | operators::DIVIDE
                    | operators::MODULO
                    | operators::NEGATE => {
                        let kinds: Vec<Kind> = call.args.iter().map(|a| self.infer(a)).collect();
                        kinds.into_iter().reduce(Kind::join).unwrap_or(Kind::Dyn)
                    }
                    _ => Kind::Dyn,
                }
            }
        }
    }
}

/// The worst-case cost estimate. `longest`: the most entries any list or map the
/// expression handles may have when nothing better is known.
struct Cost {
    longest: u64,
}

impl Cost {
    fn cost(&self, e: &IdedExpr) -> u64 {
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) | Expr::Ident(_) => STEP,
            Expr::Select(s) => STEP.saturating_add(self.cost(&s.operand)),
            Expr::List(l) => l
                .elements
                .iter()
                .fold(STEP, |acc, x| acc.saturating_add(self.cost(x))),
            Expr::Map(m) => m.entries.iter().fold(STEP, |acc, entry| match &entry.expr {
                EntryExpr::MapEntry(me) => acc
                    .saturating_add(self.cost(&me.key))
                    .saturating_add(self.cost(&me.value)),
                EntryExpr::StructField(f) => acc.saturating_add(self.cost(&f.value)),
            }),
            Expr::Struct(_) => STEP,
            Expr::Call(call) => {
                let own = match call.func_name.as_str() {
                    operators::ADD => STEP + CONCAT,
                    "matches" => STEP + REGEX,
                    _ => STEP,
                };
                let target = call.target.as_deref().map_or(0, |t| self.cost(t));
                call.args.iter().fold(own.saturating_add(target), |acc, a| {
                    acc.saturating_add(self.cost(a))
                })
            }
            Expr::Comprehension(c) => {
                let body = self
                    .cost(&c.loop_cond)
                    .saturating_add(self.cost(&c.loop_step));
                self.cost(&c.iter_range)
                    .saturating_add(self.cost(&c.accu_init))
                    .saturating_add(self.entries(&c.iter_range).saturating_mul(body))
                    .saturating_add(self.cost(&c.result))
            }
        }
    }

    /// The most entries `e` may have if it is a list or a map.
    fn entries(&self, e: &IdedExpr) -> u64 {
        match &e.expr {
            Expr::List(l) => l.elements.len() as u64,
            Expr::Map(m) => m.entries.len() as u64,
            Expr::Comprehension(c) => self.entries(&c.iter_range),
            Expr::Call(call) if call.func_name == operators::ADD => call
                .args
                .iter()
                .fold(0u64, |acc, a| acc.saturating_add(self.entries(a))),
            Expr::Call(call) if call.func_name == operators::CONDITIONAL => {
                match call.args.as_slice() {
                    [_, a, b] => self.entries(a).max(self.entries(b)),
                    _ => self.longest,
                }
            }
            Expr::Ident(name) if VARIABLES.contains(&name.as_str()) => MAX_INPUT_ENTRIES as u64,
            Expr::Select(_) if rooted_in_input(e) => MAX_INPUT_ENTRIES as u64,
            _ => self.longest,
        }
    }
}

/// Whether `e` is `var.a.b` for an input variable `var`.
fn rooted_in_input(e: &IdedExpr) -> bool {
    match &e.expr {
        Expr::Ident(name) => VARIABLES.contains(&name.as_str()),
        Expr::Select(s) if !s.test => rooted_in_input(&s.operand),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input() -> Input {
        let mut i = Input::new(1_700_000_000);
        i.caller(&SpiffeId::new("spiffe://example.org/agents/planner/sub/search-1").unwrap());
        let tctx = json!({"tool": "search", "items": [1, 2, 3], "user": {"tier": "gold"}});
        i.tctx(tctx.as_object().unwrap());
        let claims = json!({"sub": "alice", "groups": ["admins", "dev"], "email_verified": true});
        i.subject(claims.as_object().unwrap());
        let scope: BTreeSet<String> = ["search.query".to_owned()].into();
        i.request(Some(&scope), "example.org", TokenType::TxnToken);
        i
    }

    fn eval(src: &str) -> Result<bool, ConditionError> {
        Condition::new(src).unwrap().evaluate(&input())
    }

    #[test]
    fn evaluates_typical_expressions() {
        assert_eq!(eval(r#"tctx.tool == "search""#), Ok(true));
        assert_eq!(
            eval(r#""admins" in subject.groups && subject.email_verified"#),
            Ok(true)
        );
        assert_eq!(eval(r#"caller.trust_domain == "example.org""#), Ok(true));
        assert_eq!(
            eval(r#"caller.path.startsWith("/agents/planner/sub/")"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"request.scope.all(s, s.startsWith("search."))"#),
            Ok(true)
        );
        assert_eq!(
            eval(r#"request.subject_token_type == "txn_token""#),
            Ok(true)
        );
        assert_eq!(eval("lease == null"), Ok(true));
        assert_eq!(eval("now > 1600000000"), Ok(true));
        assert_eq!(eval("has(tctx.user) && tctx.user.tier == 'gold'"), Ok(true));
        assert_eq!(eval("tctx.items.exists(x, x > 2)"), Ok(true));
        assert_eq!(
            eval("tctx.items.map(x, x * 2).filter(x, x > 2).size() == 2"),
            Ok(true)
        );
        assert_eq!(eval(r#"tctx.tool.matches("^se.*h$")"#), Ok(true));
        assert_eq!(eval(r#"tctx.tool == "mail""#), Ok(false));
        assert_eq!(eval("size(rctx) == 0"), Ok(true));
    }

    #[test]
    fn lease_is_a_map_for_sub_agents() {
        let mut i = input();
        i.lease(&LeaseRecord {
            id: "l1".into(),
            child_id: SpiffeId::new("spiffe://example.org/a/sub/search-1").unwrap(),
            parent_id: SpiffeId::new("spiffe://example.org/a").unwrap(),
            entry_id: "e".into(),
            agent_id: SpiffeId::new("spiffe://example.org/writ/agent/x").unwrap(),
            depth: 1,
            task: "search".into(),
            child_pid: 1,
            child_start_time: 1,
            created_at: 1_699_999_000,
            expires_at: 1_700_000_300,
            released_at: None,
        });
        let c = Condition::new(
            r#"lease.task == tctx.tool && lease.depth == 1 && lease.expires_at - now > 60 && lease.parent == "spiffe://example.org/a""#,
        )
        .unwrap();
        assert_eq!(c.evaluate(&i), Ok(true));
    }

    #[test]
    fn evaluation_errors_and_non_bools_deny() {
        assert!(matches!(
            eval("tctx.missing == 1"),
            Err(ConditionError::Evaluation(_))
        ));
        assert!(matches!(
            eval("lease.task == 'x'"),
            Err(ConditionError::Evaluation(_))
        ));
        assert!(matches!(
            eval("9223372036854775807 + now > 0"),
            Err(ConditionError::Evaluation(_))
        ));
        // Dynamic: not known to be a bool at load, not a bool when evaluated.
        assert!(matches!(
            eval("tctx.tool"),
            Err(ConditionError::NotBool { .. })
        ));
        assert!(matches!(
            eval("tctx.items[0] / 0 == 1"),
            Err(ConditionError::Evaluation(_))
        ));
    }

    #[test]
    fn refuses_bad_conditions_at_load() {
        type Check = fn(&ConditionError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            ("".into(), |e| matches!(e, ConditionError::Syntax(_))),
            ("tctx.tool ==".into(), |e| {
                matches!(e, ConditionError::Syntax(_))
            }),
            ("(((".into(), |e| matches!(e, ConditionError::Syntax(_))),
            (
                "user.admin".into(),
                |e| matches!(e, ConditionError::UnknownVariable { name } if name == "user"),
            ),
            (
                "tctx.items.all(x, y > 1)".into(),
                |e| matches!(e, ConditionError::UnknownVariable { name } if name == "y"),
            ),
            (
                "exec('rm') == 1".into(),
                |e| matches!(e, ConditionError::UnknownFunction { name } if name == "exec"),
            ),
            ("timestamp('2020-01-01T00:00:00Z') < now".into(), |e| {
                matches!(e, ConditionError::UnknownFunction { .. })
            }),
            ("1 + 2".into(), |e| {
                matches!(e, ConditionError::NotBool { .. })
            }),
            ("'a'".into(), |e| {
                matches!(e, ConditionError::NotBool { .. })
            }),
            ("size(tctx)".into(), |e| {
                matches!(e, ConditionError::NotBool { .. })
            }),
            ("tctx.items.map(x, x)".into(), |e| {
                matches!(e, ConditionError::NotBool { .. })
            }),
            ("now".into(), |e| {
                matches!(e, ConditionError::NotBool { .. })
            }),
            (
                format!("tctx.tool == '{}'", "a".repeat(MAX_CONDITION_BYTES)),
                |e| matches!(e, ConditionError::TooLarge(_)),
            ),
            (format!("{}true{}", "(".repeat(100), ")".repeat(100)), |e| {
                matches!(e, ConditionError::TooLarge(_))
            }),
            (format!("[{}].size() == 1", vec!["1"; 300].join(",")), |e| {
                matches!(e, ConditionError::TooLarge(_))
            }),
            (
                "tctx.a.all(x, tctx.b.all(y, tctx.c.all(z, x == y)))".into(),
                |e| matches!(e, ConditionError::TooLarge(_)),
            ),
            // Two loops over inputs of up to 1024 entries: a million steps.
            (
                "subject.groups.all(x, subject.groups.exists(y, x == y))".into(),
                |e| matches!(e, ConditionError::TooCostly { .. }),
            ),
            // A regular expression compiled in a loop over an input.
            ("subject.groups.exists(g, g.matches('^adm'))".into(), |e| {
                matches!(e, ConditionError::TooCostly { .. })
            }),
            // Growing lists then looping over them.
            (
                "(tctx.a + tctx.a + tctx.a).all(x, (tctx.a + tctx.a).exists(y, x == y))".into(),
                |e| matches!(e, ConditionError::TooCostly { .. }),
            ),
            ("google.protobuf.Value{} == null".into(), |e| {
                matches!(
                    e,
                    ConditionError::Syntax(_) | ConditionError::UnknownVariable { .. }
                )
            }),
        ];
        for (text, check) in cases {
            let err = Condition::new(&text).unwrap_err();
            assert!(check(&err), "{text:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn only_the_variables_read_are_converted() {
        let c = Condition::new("tctx.items.all(x, x > 0) && now > 0").unwrap();
        assert_eq!(c.reads(), &["now", "tctx"]);
        let c2 = Condition::new("[1].all(tctx, tctx > 0)").unwrap();
        assert!(c2.reads().is_empty());
        // A subject over the limits is not even looked at when no condition reads it.
        let big = json!({"list": vec![1; MAX_INPUT_ENTRIES + 1]});
        let mut i = Input::new(5);
        i.only(c.reads().iter().copied());
        i.subject(big.as_object().unwrap());
        i.tctx(json!({"items": [1, 2]}).as_object().unwrap());
        assert_eq!(c.evaluate(&i), Ok(true));
    }

    #[test]
    fn repeated_unary_operators_fold() {
        // The parser folds `!!`: no deep tree, whatever the count.
        let c = Condition::new(&format!("{}true", "!".repeat(201))).unwrap();
        assert_eq!(c.evaluate(&input()), Ok(false));
    }

    #[test]
    fn small_nested_loops_are_allowed() {
        let c = Condition::new("[1, 2, 3].all(x, [3, 4].exists(y, x <= y))").unwrap();
        assert!(c.cost() < MAX_COST);
        assert_eq!(c.evaluate(&input()), Ok(true));
        let c = Condition::new("tctx.items.all(x, [1, 2, 3].exists(y, x == y))").unwrap();
        assert_eq!(c.evaluate(&input()), Ok(true));
    }

    #[test]
    fn refuses_large_inputs() {
        let c = Condition::new("tctx.tool == 'x'").unwrap();
        let big = json!({"list": vec![1; MAX_INPUT_ENTRIES + 1]});
        let mut i = Input::new(0);
        i.tctx(big.as_object().unwrap());
        assert!(matches!(c.evaluate(&i), Err(ConditionError::Input(_))));
        let long = json!({"s": "x".repeat(MAX_INPUT_STRING_BYTES + 1)});
        let mut i = Input::new(0);
        i.rctx(long.as_object().unwrap());
        assert!(matches!(c.evaluate(&i), Err(ConditionError::Input(_))));
        let mut deep = json!(1);
        for _ in 0..MAX_INPUT_DEPTH + 2 {
            deep = json!([deep]);
        }
        let deep = json!({ "d": deep });
        let mut i = Input::new(0);
        i.subject(deep.as_object().unwrap());
        assert!(matches!(c.evaluate(&i), Err(ConditionError::Input(_))));
        // Many values in all: lists of lists, each under the per-list limit.
        let many = json!({"a": vec![vec![0; 100]; 100]});
        let mut i = Input::new(0);
        i.tctx(many.as_object().unwrap());
        assert!(matches!(c.evaluate(&i), Err(ConditionError::Input(_))));
    }

    #[test]
    fn the_worst_accepted_expression_stays_bounded() {
        // Inputs at their limits, and an expression near the cost limit.
        let list: Vec<String> = (0..MAX_INPUT_ENTRIES).map(|i| format!("g{i}")).collect();
        let claims = json!({"groups": list});
        let mut i = Input::new(0);
        i.subject(claims.as_object().unwrap());
        let c = Condition::new(
            "subject.groups.map(g, g + g).filter(g, g.startsWith('g1')).size() > 0 && \
             subject.groups.exists_one(g, g == 'g7')",
        )
        .unwrap();
        assert!(c.cost() <= MAX_COST);
        assert_eq!(c.evaluate(&i), Ok(true));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(text in ".{0,200}") {
            if let Ok(c) = Condition::new(&text) {
                let _ = c.evaluate(&input());
            }
        }

        #[test]
        fn cel_shaped_garbage_never_panics(
            text in r#"[a-z.()\[\]{}!&|=<>+\-*/%?:,'" 0-9]{0,120}"#
        ) {
            if let Ok(c) = Condition::new(&text) {
                let _ = c.evaluate(&input());
            }
        }
    }
}
