//! Runs alert conditions: the JavaScript function bodies over `dweet` that dweet.io evaluated
//! on every dweet of an alerted thing.
//!
//! A condition is code from whoever holds a lock's key, so it runs in an embedded QuickJS
//! engine with nothing to reach: no modules, no I/O, no timers. Each evaluation gets a fresh
//! context (one condition cannot leave globals behind for the next), a deadline enforced by the
//! engine's interrupt hook (`while(true){}` is stopped, not waited for), a memory ceiling and a
//! stack ceiling. The engine is not `Send`; callers keep one per thread.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rquickjs::{CaughtError, Coerced, Context, Ctx, Function, Runtime, Value};

use serde::Serialize;

/// The protocol's limit on a condition's length, in characters.
pub const MAX_CONDITION_CHARS: usize = 2000;

/// What one evaluation may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvaluationLimits {
    /// Wall-clock time per evaluation, parsing included.
    pub time: Duration,
    /// Heap of the engine (all its contexts), in bytes.
    pub memory_bytes: usize,
}

impl Default for EvaluationLimits {
    fn default() -> Self {
        EvaluationLimits {
            time: Duration::from_millis(50),
            memory_bytes: 16 << 20,
        }
    }
}

/// What a condition said about one dweet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It returned a string or another truthy value; `message` is that value as a string.
    Fired { message: String },
    /// It returned a falsy value (or nothing).
    Quiet,
}

/// Why a condition could not give a verdict. None of these fails the dweet it ran on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConditionError {
    #[error("the condition is empty")]
    Empty,
    #[error(
        "the condition is {0} characters long; the limit is {MAX_CONDITION_CHARS} (the service's)"
    )]
    TooLong(usize),
    #[error("the condition does not parse: {0}")]
    Syntax(String),
    #[error("the condition threw: {0}")]
    Threw(String),
    #[error("the condition ran longer than {0:?} and was stopped")]
    TimedOut(Duration),
    #[error("the condition used more than the engine's memory ceiling")]
    OutOfMemory,
    #[error("the dweet's content is not JSON the engine accepts: {0}")]
    Content(String),
    #[error("the JavaScript engine failed: {0}")]
    Engine(String),
}

/// One QuickJS runtime with its limits installed.
pub struct ConditionEngine {
    runtime: Runtime,
    deadline: Rc<Cell<Option<Instant>>>,
    limits: EvaluationLimits,
}

impl ConditionEngine {
    pub fn new(limits: EvaluationLimits) -> Result<Self, ConditionError> {
        let runtime = Runtime::new().map_err(|e| ConditionError::Engine(e.to_string()))?;
        runtime.set_memory_limit(limits.memory_bytes);
        // Deep recursion must end as a RangeError, well before the thread's own stack does.
        runtime.set_max_stack_size(256 * 1024);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let watched = Rc::clone(&deadline);
        runtime.set_interrupt_handler(Some(Box::new(move || {
            watched.get().is_some_and(|at| Instant::now() >= at)
        })));
        Ok(ConditionEngine {
            runtime,
            deadline,
            limits,
        })
    }

    /// Checks that `condition` is a function body the engine accepts (not empty, within the
    /// service's length limit, parsing), without running it: the one check config files, the
    /// CLI and the sandbox all make.
    pub fn check(&mut self, condition: &str) -> Result<(), ConditionError> {
        if condition.trim().is_empty() {
            return Err(ConditionError::Empty);
        }
        self.with_fresh_context(condition, |_, _| Ok(Verdict::Quiet))
            .map(|_| ())
    }

    /// Runs `condition` with `dweet` bound to `content_json` (the dweet's content).
    pub fn evaluate(
        &mut self,
        condition: &str,
        content_json: &str,
    ) -> Result<Verdict, ConditionError> {
        self.with_fresh_context(condition, |ctx, function| {
            let dweet = ctx
                .json_parse(content_json)
                .map_err(|e| ConditionError::Content(describe(ctx, e)))?;
            let returned: Value = function
                .call((dweet,))
                .map_err(|e| self.classify(ctx, e, ConditionError::Threw))?;
            verdict(ctx, returned)
        })
    }

    fn with_fresh_context(
        &self,
        condition: &str,
        run: impl for<'js> FnOnce(&Ctx<'js>, Function<'js>) -> Result<Verdict, ConditionError>,
    ) -> Result<Verdict, ConditionError> {
        let chars = condition.chars().count();
        if chars > MAX_CONDITION_CHARS {
            return Err(ConditionError::TooLong(chars));
        }
        self.deadline.set(Some(Instant::now() + self.limits.time));
        let result = Context::full(&self.runtime)
            .map_err(|e| ConditionError::Engine(e.to_string()))
            .and_then(|context| {
                context.with(|ctx| {
                    // The Function constructor rather than our own `(function(dweet){..})`
                    // text: syntax errors then name the condition, not our wrapper.
                    let constructor: Function = ctx
                        .globals()
                        .get("Function")
                        .map_err(|e| ConditionError::Engine(e.to_string()))?;
                    let function: Function = constructor
                        .call(("dweet", condition))
                        .map_err(|e| self.classify(&ctx, e, ConditionError::Syntax))?;
                    run(&ctx, function)
                })
            });
        self.deadline.set(None);
        // Whatever the condition allocated goes now, so the next one starts with the full
        // memory ceiling.
        self.runtime.run_gc();
        result
    }

    fn classify(
        &self,
        ctx: &Ctx<'_>,
        error: rquickjs::Error,
        otherwise: fn(String) -> ConditionError,
    ) -> ConditionError {
        if self.deadline.get().is_some_and(|at| Instant::now() >= at) {
            return ConditionError::TimedOut(self.limits.time);
        }
        let caught = CaughtError::from_error(ctx, error);
        if is_out_of_memory(&caught) {
            return ConditionError::OutOfMemory;
        }
        otherwise(describe_caught(caught))
    }
}

/// Whether QuickJS stopped a condition at the memory ceiling: it throws its own
/// `InternalError` "out of memory", or null when it cannot allocate even that (a condition's
/// own `throw null` reads the same). An `Error` the condition throws itself is what it threw,
/// whatever its message says.
fn is_out_of_memory(caught: &CaughtError<'_>) -> bool {
    match caught {
        CaughtError::Value(value) => value.is_null(),
        CaughtError::Exception(exception) => {
            exception.message().as_deref() == Some("out of memory")
                && exception
                    .get::<_, String>("name")
                    .is_ok_and(|name| name == "InternalError")
        }
        CaughtError::Error(_) => false,
    }
}

/// Why an alert is being notified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationKind {
    /// The condition fired on a dweet while the alert was closed.
    Opened,
    /// The condition was quiet on a dweet while the alert was open.
    Closed,
}

impl NotificationKind {
    /// `opened` or `closed`, as stored alert events and notifications say it.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Opened => "opened",
            NotificationKind::Closed => "closed",
        }
    }
}

/// Whether an alert opens or closes on a verdict: the one rule the sandbox's alert status and
/// `dweetpipe alert test` both follow. `None` when it stays as it was.
pub fn transition(open: bool, verdict: &Verdict) -> Option<NotificationKind> {
    match (open, verdict) {
        (false, Verdict::Fired { .. }) => Some(NotificationKind::Opened),
        (true, Verdict::Quiet) => Some(NotificationKind::Closed),
        _ => None,
    }
}

/// JavaScript truthiness, with a string's own text as the message.
fn verdict(ctx: &Ctx<'_>, returned: Value<'_>) -> Result<Verdict, ConditionError> {
    let truthy = returned
        .get::<Coerced<bool>>()
        .map_err(|e| ConditionError::Engine(describe(ctx, e)))?
        .0;
    if !truthy {
        return Ok(Verdict::Quiet);
    }
    let message = returned
        .get::<Coerced<String>>()
        .map_err(|e| ConditionError::Threw(describe(ctx, e)))?
        .0;
    Ok(Verdict::Fired { message })
}

/// The thrown value's message when the error is a JavaScript exception.
fn describe(ctx: &Ctx<'_>, error: rquickjs::Error) -> String {
    describe_caught(CaughtError::from_error(ctx, error))
}

fn describe_caught(caught: CaughtError<'_>) -> String {
    match caught {
        CaughtError::Exception(exception) => exception
            .message()
            .unwrap_or_else(|| "an exception without a message".to_owned()),
        CaughtError::Value(value) => value
            .get::<Coerced<String>>()
            .map(|text| text.0)
            .unwrap_or_else(|_| "a value that is not an Error".to_owned()),
        CaughtError::Error(error) => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> ConditionEngine {
        ConditionEngine::new(EvaluationLimits::default()).unwrap()
    }

    fn engine_with_time(time: Duration) -> ConditionEngine {
        ConditionEngine::new(EvaluationLimits {
            time,
            ..EvaluationLimits::default()
        })
        .unwrap()
    }

    #[test]
    fn the_protocol_example_fires_and_stays_quiet() {
        let mut engine = engine();
        let condition = "if(dweet.alertValue > 10) return 'TEST: Greater than 10';";
        assert_eq!(
            engine.evaluate(condition, r#"{"alertValue":11}"#),
            Ok(Verdict::Fired {
                message: "TEST: Greater than 10".to_owned()
            })
        );
        assert_eq!(
            engine.evaluate(condition, r#"{"alertValue":3}"#),
            Ok(Verdict::Quiet)
        );
        assert_eq!(engine.evaluate(condition, "{}"), Ok(Verdict::Quiet));
    }

    #[test]
    fn truthiness_follows_javascript() {
        let mut engine = engine();
        for (body, expected) in [
            ("return true;", Some("true")),
            ("return 1;", Some("1")),
            ("return {a:1};", Some("[object Object]")),
            ("return '';", None),
            ("return 0;", None),
            ("return null;", None),
            ("return NaN;", None),
            ("", None),
        ] {
            let verdict = engine.evaluate(body, "{}").unwrap();
            let expected = expected.map_or(Verdict::Quiet, |message| Verdict::Fired {
                message: message.to_owned(),
            });
            assert_eq!(verdict, expected, "{body}");
        }
    }

    #[test]
    fn nested_sensor_paths_work() {
        let mut engine = engine();
        let verdict = engine
            .evaluate(
                "if(dweet.sensors.TemperatureC > 40) return 'too hot: ' + dweet.sensors.TemperatureC;",
                r#"{"sensors":{"TemperatureC":41.5}}"#,
            )
            .unwrap();
        assert_eq!(
            verdict,
            Verdict::Fired {
                message: "too hot: 41.5".to_owned()
            }
        );
    }

    #[test]
    fn a_condition_that_hoards_memory_is_stopped_at_the_ceiling() {
        // Time enough to reach the ceiling, so only the memory can stop it.
        let mut engine = engine_with_time(Duration::from_secs(60));
        for hoarding in [
            "var a = []; while(true) { a.push('xxxxxxxxxxxxxxxx' + a.length); }",
            "var s = 'x'; while(true) { s = s + s; }",
        ] {
            assert_eq!(
                engine.evaluate(hoarding, "{}"),
                Err(ConditionError::OutOfMemory),
                "{hoarding}"
            );
        }
        assert_eq!(
            engine.evaluate("return 'still here';", "{}").unwrap(),
            Verdict::Fired {
                message: "still here".to_owned()
            }
        );
    }

    #[test]
    fn runaway_conditions_are_stopped_and_the_engine_goes_on() {
        let mut engine = engine_with_time(Duration::from_millis(30));
        assert_eq!(
            engine.evaluate("while(true){}", "{}"),
            Err(ConditionError::TimedOut(Duration::from_millis(30)))
        );
        let hoarding = engine.evaluate(
            "var a = []; while(true) { a.push('xxxxxxxxxxxxxxxx' + a.length); }",
            "{}",
        );
        assert!(
            matches!(
                hoarding,
                Err(ConditionError::OutOfMemory | ConditionError::TimedOut(_))
            ),
            "{hoarding:?}"
        );
        // Where the ceiling leaves no room for the error object, QuickJS throws null instead
        // (what made the line above fail now and then when tests ran side by side).
        assert_eq!(
            engine.evaluate("throw null;", "{}"),
            Err(ConditionError::OutOfMemory)
        );
        // Only the value null: a thrown text that reads "null" is what the condition threw.
        assert_eq!(
            engine.evaluate("throw 'null';", "{}"),
            Err(ConditionError::Threw("null".to_owned()))
        );
        // Only QuickJS's own error: a condition's Error that says so is what it threw.
        assert_eq!(
            engine.evaluate("throw new Error('out of memory');", "{}"),
            Err(ConditionError::Threw("out of memory".to_owned()))
        );
        assert_eq!(
            engine.evaluate("throw new Error('the board ran out of memory');", "{}"),
            Err(ConditionError::Threw(
                "the board ran out of memory".to_owned()
            ))
        );
        assert!(matches!(
            engine.evaluate("function f(n){ return f(n+1) + 1; } return f(0);", "{}"),
            Err(ConditionError::Threw(_))
        ));
        assert_eq!(
            engine.evaluate("return 'still here';", "{}").unwrap(),
            Verdict::Fired {
                message: "still here".to_owned()
            }
        );
    }

    #[test]
    fn broken_conditions_are_errors_not_verdicts() {
        let mut engine = engine();
        assert!(matches!(
            engine.evaluate("if(", "{}"),
            Err(ConditionError::Syntax(_))
        ));
        assert!(matches!(
            engine.evaluate("return dweet.missing.deeper;", "{}"),
            Err(ConditionError::Threw(message)) if message.contains("deeper")
        ));
        assert_eq!(
            engine.evaluate(&"x".repeat(MAX_CONDITION_CHARS + 1), "{}"),
            Err(ConditionError::TooLong(MAX_CONDITION_CHARS + 1))
        );
        // QuickJS's Function constructor splices the body into source text, so a body can
        // close the function early; what it then runs is still under the same limits.
        assert!(matches!(
            engine.check("}); while(true){} (function(){"),
            Err(ConditionError::TimedOut(_))
        ));
    }

    #[test]
    fn hostile_content_is_an_error_or_a_verdict_never_a_crash() {
        let mut engine = engine();
        let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        let wide = format!(
            "{{{}}}",
            (0..10_000)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        for content in [
            deep.as_str(),
            wide.as_str(),
            "not json",
            "{\"a\":\"\\u0000\"}",
        ] {
            let outcome = engine.evaluate("return JSON.stringify(dweet).length > 3;", content);
            assert!(
                matches!(
                    outcome,
                    Ok(_) | Err(ConditionError::Content(_) | ConditionError::Threw(_))
                ),
                "{outcome:?}"
            );
        }
        assert_eq!(
            engine.evaluate("return 'fine';", "{}"),
            Ok(Verdict::Fired {
                message: "fine".to_owned()
            })
        );
    }

    #[test]
    fn one_condition_leaves_nothing_for_the_next() {
        let mut engine = engine();
        engine.evaluate("globalThis.leak = 'x';", "{}").unwrap();
        assert_eq!(
            engine.evaluate("return typeof leak !== 'undefined';", "{}"),
            Ok(Verdict::Quiet)
        );
    }

    #[test]
    fn there_is_nothing_to_reach() {
        let mut engine = engine();
        for probe in [
            "require",
            "process",
            "fetch",
            "XMLHttpRequest",
            "std",
            "os",
            "setTimeout",
        ] {
            let verdict = engine
                .evaluate(&format!("return typeof {probe} !== 'undefined';"), "{}")
                .unwrap();
            assert_eq!(verdict, Verdict::Quiet, "{probe} is reachable");
        }
    }
}
