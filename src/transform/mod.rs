//! Transforms in the jq language (contract §10 "Transform"): a source's program, compiled
//! once per configuration, run on each verified payload before it is decoded.
//!
//! Owns: the jaq set-up (core + std + json definitions; `env` answers `{}` and `stderr` writes
//! nothing, so neither secrets nor payloads leave through them), compile errors with a line
//! and column ([`compile`]), one run from payload bytes to output bytes ([`run_bytes`], what
//! a worker process does), and what a source holds ([`Transform`]). It must not run a program
//! in the relay's own process on the request path: a jaq run cannot be interrupted, and a deep
//! recursion or a huge allocation aborts the whole process. Runs happen in [`pool`]'s worker
//! processes, which [`worker`] is the inside of.

pub mod pool;
pub mod worker;

use std::sync::Arc;

use jaq_core::{
    Ctx, RunPtr, Vars,
    box_iter::box_once,
    data::JustLut,
    load::{self, Arena, File, Loader},
    native,
};
use jaq_json::Val;

pub use pool::{PoolError, Transforms, WorkerCommand, use_worker_binary};

type D = JustLut<Val>;
type Filter = jaq_core::Filter<D>;

/// Outputs above this are a `transform_error`: `repeat(.)` must not fill memory one output at
/// a time (it streams millions a second), and no webhook fans out this far.
pub const MAX_OUTPUTS: usize = 1000;

/// What a source does to a payload before decoding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    /// No program, or exactly `.`: the payload is decoded as received, in-process (no worker,
    /// and the same idempotency keys either way).
    Identity,
    /// A program that compiled; `slot` is its index in the generation's [`Transforms`].
    Jq { code: Arc<str>, slot: usize },
}

impl Transform {
    /// The program's text, as configured (`None` for [`Transform::Identity`]).
    pub fn code(&self) -> Option<&str> {
        match self {
            Transform::Identity => None,
            Transform::Jq { code, .. } => Some(code),
        }
    }
}

/// Whether `code` is the identity program, which skips the worker.
pub fn is_identity(code: &str) -> bool {
    code.trim() == "."
}

/// A compiled program, ready to run on many payloads.
pub struct Program {
    filter: Filter,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").finish_non_exhaustive()
    }
}

/// A program that does not compile: the first error, with its position in the program text.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{message} at line {line}, column {column}")]
pub struct CompileError {
    pub message: String,
    /// 1-based, counted in characters.
    pub line: usize,
    pub column: usize,
}

/// A run that produced no usable list of objects; its text goes into the dead letter's detail.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    #[error("jq error: {0}")]
    Jq(String),
    #[error("the program called halt({0})")]
    Halt(i32),
    #[error("output {index} is {kind}, not an object")]
    NotAnObject { index: usize, kind: &'static str },
    #[error("output {index} cannot be written as JSON")]
    NotJson { index: usize },
    #[error("more than {MAX_OUTPUTS} outputs")]
    TooManyOutputs,
    /// jaq leaked an internal control-flow exception (a jaq bug, never expected).
    #[error("internal jaq exception")]
    Internal,
}

/// Why a payload was not run at all: it is not a JSON object (the sender's mistake, 400).
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("the payload is not a JSON object")]
pub struct NotAnObject;

/// Compiles `code` with jq's standard library.
///
/// `env` answers `{}` (the relay's environment holds secrets) and `stderr`/`debug` write
/// nothing (payloads must not reach the logs); module loading (`import`, `include`) is refused.
pub fn compile(code: &str) -> Result<Program, CompileError> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let arena = Arena::default();
    let modules = Loader::new(defs)
        .load(&arena, File { code, path: () })
        .map_err(|errs| load_error(code, errs))?;
    jaq_core::Compiler::<&str, D>::default()
        .with_funs(funs())
        .compile(modules)
        .map(|filter| Program { filter })
        .map_err(|errs| match errs.into_iter().flat_map(|(_, e)| e).next() {
            Some((found, undefined)) => at(
                code,
                found,
                format!("undefined {} `{found}`", undefined.as_str()),
            ),
            None => at(code, "", "does not compile".into()),
        })
}

fn funs() -> impl Iterator<Item = native::Fun<D>> {
    fn empty_obj(_: jaq_core::Cv<'_, D>) -> jaq_core::ValXs<'_, Val> {
        box_once(Ok(Val::obj(Default::default())))
    }
    fn nothing(_: jaq_core::Cv<'_, D>) -> jaq_core::ValXs<'_, Val> {
        Box::new(core::iter::empty())
    }
    let replaced = ["env", "stderr_empty"];
    let overrides: [native::Fun<D>; 2] = [
        native::run::<D>(("env", Box::new([]), empty_obj as RunPtr<D>)),
        native::run::<D>(("stderr_empty", Box::new([]), nothing as RunPtr<D>)),
    ];
    jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs())
        .filter(move |(name, args, _)| !(args.is_empty() && replaced.contains(name)))
        .chain(overrides)
}

fn load_error(code: &str, errs: load::Errors<&str, ()>) -> CompileError {
    use load::Error;
    for (_, err) in errs {
        let first = match err {
            Error::Io(e) => e.into_iter().next(),
            Error::Lex(e) => e
                .into_iter()
                .next()
                .map(|(exp, found)| (found, format!("expected {}", exp.as_str()))),
            Error::Parse(e) => e
                .into_iter()
                .next()
                .map(|(exp, found)| (found, format!("expected {}", exp.as_str()))),
        };
        if let Some((found, message)) = first {
            return at(code, found, message);
        }
    }
    at(code, "", "does not parse".into())
}

/// `found` is a slice of `code` (jaq reports positions that way); an empty one at its end.
fn at(code: &str, found: &str, message: String) -> CompileError {
    // Whether `found` lies inside `code` is checked, not trusted.
    let (start, p) = (code.as_ptr() as usize, found.as_ptr() as usize);
    let offset = if p >= start && p <= start + code.len() {
        p - start
    } else {
        code.len()
    };
    let before = code.get(..offset).unwrap_or(code);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    // One line: the message goes into a configuration error that names its key.
    let message = message.replace(['\n', '\r'], " ");
    CompileError {
        message,
        line,
        column,
    }
}

/// Runs `program` on the payload `input` and writes its outputs as one JSON array.
///
/// jaq's own reader and writer, never `serde_json::Value`: decimal literals and big integers
/// stay as they came, and the relay's serde_json (`arbitrary_precision`) is not involved.
/// Bounded in outputs only: time, stack and memory are bounded by the worker process.
pub fn run_bytes(
    program: &Program,
    input: &[u8],
) -> Result<Result<Vec<u8>, RunError>, NotAnObject> {
    let input = match jaq_json::read::parse_single(input) {
        Ok(input @ Val::Obj(_)) => input,
        _ => return Err(NotAnObject),
    };
    let ctx = Ctx::<D>::new(&program.filter.lut, Vars::new([]));
    let mut out = Vec::with_capacity(256);
    out.push(b'[');
    for (index, val) in program.filter.id.run((ctx, input)).enumerate() {
        if index >= MAX_OUTPUTS {
            return Ok(Err(RunError::TooManyOutputs));
        }
        // Never `jaq_core::unwrap_valr`: it calls `std::process::exit` on `halt`.
        let val = match val {
            Ok(val) => val,
            Err(exn) => {
                return Ok(Err(match exn.get_err() {
                    // A string error value reads as jq prints it: `error("boom")` is `boom`.
                    Ok(err) => RunError::Jq(match err.into_val() {
                        Val::TStr(s) => String::from_utf8_lossy(&s).into_owned(),
                        other => other.to_string(),
                    }),
                    Err(exn) => exn.get_halt().map_or(RunError::Internal, RunError::Halt),
                }));
            }
        };
        let Val::Obj(_) = &val else {
            return Ok(Err(RunError::NotAnObject {
                index,
                kind: kind(&val),
            }));
        };
        if index > 0 {
            out.push(b',');
        }
        // jaq's writer prints NaN and byte strings as non-JSON: the relay's reader of these
        // bytes refuses them, which is a `transform_error`, never a wrong event.
        if jaq_json::write::write(&mut out, &jaq_json::write::Pp::default(), 0, &val).is_err() {
            return Ok(Err(RunError::NotJson { index }));
        }
    }
    out.push(b']');
    Ok(Ok(out))
}

fn kind(v: &Val) -> &'static str {
    match v {
        Val::Null => "null",
        Val::Bool(_) => "a boolean",
        Val::Num(_) => "a number",
        Val::TStr(_) | Val::BStr(_) => "a string",
        Val::Arr(_) => "an array",
        Val::Obj(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn go(code: &str, input: Value) -> Result<Vec<Value>, RunError> {
        let program = compile(code).unwrap();
        let bytes = run_bytes(&program, input.to_string().as_bytes()).unwrap()?;
        Ok(serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn a_compiled_program_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        send_sync(&compile(".").unwrap());
    }

    #[test]
    fn compile_errors_name_the_line_and_column() {
        assert_eq!(
            compile(".a |\n  foo(1)").err(),
            Some(CompileError {
                message: "undefined filter `foo`".into(),
                line: 2,
                column: 3
            })
        );
        let e = compile("{a: .b").unwrap_err();
        assert_eq!((e.line, e.column), (1, 7), "{e}");
        let e = compile(".a | | .b").unwrap_err();
        assert_eq!((e.line, e.column), (1, 6), "{e}");
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        assert_eq!(
            compile("$x").map(|_| ()).map_err(|e| e.message),
            Err("undefined variable `$x`".into())
        );
    }

    #[test]
    fn module_loading_is_refused_at_compile_time() {
        assert!(compile("include \"x\"; .").is_err());
        assert!(compile("import \"x\" as x; .").is_err());
    }

    #[test]
    fn outputs_are_collected_in_order_and_none_is_an_empty_array() {
        assert_eq!(
            go(".items[]", json!({"items": [{"a": 1}, {"a": 2}]})),
            Ok(vec![json!({"a": 1}), json!({"a": 2})])
        );
        assert_eq!(
            go("select(.kind == \"x\")", json!({"kind": "y"})),
            Ok(vec![])
        );
    }

    #[test]
    fn a_non_object_output_is_an_error_naming_its_index() {
        assert_eq!(
            go("., 1", json!({})),
            Err(RunError::NotAnObject {
                index: 1,
                kind: "a number"
            })
        );
    }

    #[test]
    fn runtime_errors_and_halt_are_errors_not_exits() {
        assert_eq!(
            go("error(\"boom\")", json!({})),
            Err(RunError::Jq("boom".into()))
        );
        assert_eq!(go("halt", json!({})), Err(RunError::Halt(0)));
        assert_eq!(
            go("\"x\" | halt_error(3)", json!({})),
            Err(RunError::Halt(3))
        );
    }

    #[test]
    fn env_is_empty_so_secrets_cannot_leak_into_events() {
        assert!(std::env::vars().next().is_some());
        assert_eq!(go("{e: env}", json!({})), Ok(vec![json!({"e": {}})]));
    }

    #[test]
    fn repeat_stops_at_the_output_cap() {
        assert_eq!(go("repeat(.)", json!({})), Err(RunError::TooManyOutputs));
    }

    #[test]
    fn a_payload_that_is_not_an_object_is_not_run() {
        let program = compile(".").unwrap();
        assert_eq!(run_bytes(&program, b"[1]"), Err(NotAnObject));
        assert_eq!(run_bytes(&program, b"{"), Err(NotAnObject));
    }

    #[test]
    fn numbers_keep_their_text() {
        let out = run_bytes(
            &compile(".").unwrap(),
            br#"{"big":123456789012345678901234567890,"f":1.50}"#,
        )
        .unwrap()
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("123456789012345678901234567890"), "{text}");
    }

    #[test]
    fn identity_is_recognised_with_surrounding_space_only() {
        assert!(is_identity("."));
        assert!(is_identity(" .\n"));
        assert!(!is_identity(". | ."));
        assert!(!is_identity(".a"));
    }
}
