//! Structured logs: JSON lines on stderr (text when stderr is a terminal), one stable
//! `event` name per thing that happens.
//!
//! Once bound, every line carries `sandbox_id`, `claim_uid` and `pod_uid`. Those are
//! process-wide context, not span fields: spawned tasks do not inherit spans, and an
//! operator grepping for a sandbox must find every line of it.

use std::io::Write;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

static CONTEXT: RwLock<Vec<(&'static str, String)>> = RwLock::new(Vec::new());

/// Adds (or replaces) a field printed on every later line.
pub fn set_context(key: &'static str, value: impl Into<String>) {
    let mut ctx = CONTEXT.write().unwrap_or_else(|e| e.into_inner());
    let value = value.into();
    match ctx.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => ctx.push((key, value)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// Installs the global subscriber. `filter` is a level ("info", "debug", …) or a
/// comma-separated list of `target=level` directives with an optional default level
/// ("info,h2=debug"). That is tracing's `Targets` syntax: EnvFilter's span and field
/// filters are not offered, since they bring a regex engine into the binary every
/// sandbox maps (dropping it and zstd's legacy decoders saved 0.77 MiB).
pub fn init(format: Format, filter: &str) -> Result<(), String> {
    let filter = parse_filter(filter)?;
    tracing_subscriber::registry()
        .with(filter)
        .with(LineLayer { format })
        .try_init()
        .map_err(|e| format!("logging was already initialised: {e}"))
}

fn parse_filter(filter: &str) -> Result<Targets, String> {
    let bad = |why: String| {
        format!("--log-level {filter:?}: {why}; expected a level (off, error, warn, info, debug, trace) or target=level directives separated by commas, e.g. \"info,h2=debug\"")
    };
    // `Targets` reads a bare word as a target with every level on, so a misspelt level
    // ("degub") would silently log nothing else: only levels may stand alone here.
    for word in filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.contains('='))
    {
        if word.parse::<tracing::level_filters::LevelFilter>().is_err() {
            return Err(bad(format!("{word:?} is not a level")));
        }
    }
    filter.parse().map_err(|e| bad(format!("{e}")))
}

struct LineLayer {
    format: Format,
}

#[derive(Default)]
struct Fields {
    message: Option<String>,
    event: Option<String>,
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = Some(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            name => {
                self.rest.insert(name.to_owned(), value.into());
            }
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.rest.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.rest.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.rest.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.rest.insert(field.name().to_owned(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for LineLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let meta = event.metadata();
        let level = level_name(meta.level());
        let event_name = f.event.unwrap_or_else(|| meta.target().to_owned());
        let ctx = CONTEXT.read().unwrap_or_else(|e| e.into_inner()).clone();
        let line = match self.format {
            Format::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert("ts".into(), rfc3339_now().into());
                obj.insert("level".into(), level.into());
                obj.insert("event".into(), event_name.into());
                if let Some(m) = f.message {
                    obj.insert("msg".into(), m.into());
                }
                for (k, v) in ctx {
                    obj.insert(k.into(), v.into());
                }
                obj.extend(f.rest);
                let mut s = serde_json::Value::Object(obj).to_string();
                s.push('\n');
                s
            }
            Format::Text => {
                let mut s = format!(
                    "{} {:5} {:24} {}",
                    rfc3339_now(),
                    level,
                    event_name,
                    f.message.unwrap_or_default()
                );
                for (k, v) in ctx.iter() {
                    s.push_str(&format!(" {k}={v}"));
                }
                for (k, v) in f.rest {
                    match v {
                        serde_json::Value::String(v) => s.push_str(&format!(" {k}={v:?}")),
                        other => s.push_str(&format!(" {k}={other}")),
                    }
                }
                s.push('\n');
                s
            }
        };
        // One write per line, so lines from different threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let t = super::rfc3339_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T');
    }

    #[test]
    fn log_filters_take_a_level_or_target_directives_and_name_what_is_wrong() {
        use tracing::level_filters::LevelFilter;
        use tracing::Level;
        let f = super::parse_filter("info").unwrap();
        assert!(f.would_enable("h2::codec", &Level::INFO));
        assert!(!f.would_enable("h2::codec", &Level::DEBUG));
        let f = super::parse_filter("warn,h2=debug,sandbox_supervisor::relay=trace").unwrap();
        assert!(f.would_enable("h2::codec", &Level::DEBUG));
        assert!(f.would_enable("sandbox_supervisor::relay::stream", &Level::TRACE));
        assert!(!f.would_enable("sandbox_supervisor::exec", &Level::INFO));
        assert_eq!(f.default_level(), Some(LevelFilter::WARN));
        for bad in ["loud", "info,degub", "h2=loud"] {
            let e = super::parse_filter(bad).unwrap_err();
            assert!(
                e.contains(&format!("--log-level {bad:?}")) && e.contains("info,h2=debug"),
                "{e}"
            );
        }
    }
}
