//! Process-wide logs: human lines on stderr by default, JSON lines on
//! request; the filter (`log.level`) changes while the broker runs.
//!
//! The binary calls [`init_from_env`] first thing (`KAELIX_LOG` or
//! `RUST_LOG` for the filter, `KAELIX_LOG_FORMAT=json`); `kaelix serve`
//! then applies the configuration's `[log]` with [`apply`], and a reload
//! calls [`set_level`]. Without [`init_from_env`] (the library in a test)
//! nothing is installed and [`set_level`] only checks its argument.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;

type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type FormatLayer = Box<dyn Layer<Filtered> + Send + Sync>;

struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<FormatLayer, Filtered>,
    current: std::sync::Mutex<(String, LogFormat)>,
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

fn format_layer(format: LogFormat) -> FormatLayer {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Human => Box::new(layer),
        LogFormat::Json => Box::new(layer.json()),
    }
}

/// Install the process's subscriber from the environment: `KAELIX_LOG`
/// (or `RUST_LOG`) is the filter (default `info`), `KAELIX_LOG_FORMAT=json`
/// switches to JSON lines. A second call does nothing.
pub fn init_from_env() {
    let level = std::env::var("KAELIX_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .filter(|level| EnvFilter::try_new(level).is_ok())
        .unwrap_or_else(|| "info".to_string());
    let format = match std::env::var("KAELIX_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Human,
    };
    init(&level, format);
}

/// Install the process's subscriber with this filter and format (an
/// invalid filter falls back to `info`). A second call does nothing.
pub fn init(level: &str, format: LogFormat) {
    if CONTROL.get().is_some() {
        return;
    }
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter_layer, filter_handle) = reload::Layer::new(filter);
    let (format_layer, format_handle) = reload::Layer::new(format_layer(format));
    let installed = tracing_subscriber::registry()
        .with(filter_layer)
        .with(format_layer)
        .try_init()
        .is_ok();
    if installed {
        let _ = CONTROL.set(LogControl {
            filter: filter_handle,
            format: format_handle,
            current: std::sync::Mutex::new((level.to_string(), format)),
        });
    }
}

/// Change the filter. Checks `level` even when no subscriber is installed.
pub fn set_level(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|err| format!("{level:?}: {err}"))?;
    if let Some(control) = CONTROL.get() {
        control
            .filter
            .reload(filter)
            .map_err(|err| format!("cannot change the log filter: {err}"))?;
        lock(control).0 = level.to_string();
    }
    Ok(())
}

/// Apply the configuration's `[log]` section (at start).
pub fn apply(level: &str, format: LogFormat) -> Result<(), String> {
    set_level(level)?;
    if let Some(control) = CONTROL.get() {
        let mut current = lock(control);
        if current.1 != format {
            control
                .format
                .reload(format_layer(format))
                .map_err(|err| format!("cannot change the log format: {err}"))?;
            current.1 = format;
        }
    }
    Ok(())
}

/// The filter in force, when a subscriber is installed.
pub fn current_level() -> Option<String> {
    CONTROL.get().map(|control| lock(control).0.clone())
}

fn lock(control: &LogControl) -> std::sync::MutexGuard<'_, (String, LogFormat)> {
    // The guarded value is two plain fields, consistent after any panic.
    control
        .current
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_refused_without_a_subscriber() {
        assert!(set_level("info,kaelix_controlplane=debug").is_ok());
        let err = set_level("=[bad").unwrap_err();
        assert!(err.contains("=[bad"), "{err}");
    }
}
