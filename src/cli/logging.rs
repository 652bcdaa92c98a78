//! The agent's own log, on stderr: plain text (no colours unless stderr is
//! a terminal) or one JSON object per line. Under systemd's journal (its
//! `$JOURNAL_STREAM` names our stderr) text lines lose their timestamp,
//! which the journal adds, and gain a `<N>` syslog priority prefix, which
//! it turns into the entry's priority. Lines inside a job carry its
//! `job_id` from the `job` span (text: `job{job_id=..}:`; JSON: `span` and
//! `spans`). Nothing here sees a secret: they are a type that prints
//! `[MASKED]`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Adds the syslog priority of the event's level in front of a line.
struct SyslogPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Whether stderr is the journal's stream: `$JOURNAL_STREAM` is
/// "DEVICE:INODE" of the stream systemd connected.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    value == format!("{}:{}", meta.dev(), meta.ino())
}

/// Sets up the process's tracing: `RUNNEL_LOG` (an env-filter) or
/// `default_filter`, in `format`.
pub fn init(default_filter: &str, format: LogFormat) {
    let mut filter = EnvFilter::try_from_env("RUNNEL_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    // The NATS client's own lines repeat the agent's (see fleet::Servers)
    // unless asked for by name.
    if !std::env::var("RUNNEL_LOG").is_ok_and(|f| f.contains("async_nats"))
        && let Ok(quiet) = "async_nats=warn".parse()
    {
        filter = filter.add_directive(quiet);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
        LogFormat::Text if stderr_is_journal() => {
            let text = tracing_subscriber::fmt::format()
                .with_target(false)
                .without_time();
            builder.with_ansi(false).event_format(SyslogPriority(text)).init()
        }
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}
