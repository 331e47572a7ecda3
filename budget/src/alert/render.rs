//! An alert's facts as text a person reads on a phone: [`plain`] (the alert's stored `text`,
//! the same in the webhook) and [`telegram_html`] (Telegram's `parse_mode: HTML`, rendered
//! at each send attempt so it can say how long ago the event was).
//!
//! Every interpolated value (a deployment name, an operator's name, a reason, an incident's
//! title) has its control characters turned into spaces, so it cannot forge a line of its
//! own, and is escaped for HTML (`<`, `>`, `&`, `"`: the entities Telegram knows). Telegram
//! refuses a message over 4,096 characters; the HTML text, tags and entities included, is
//! kept within that many UTF-16 code units (a stricter bound than Telegram's, which counts
//! after parsing). Short values are capped at a fixed length; the one long value of a
//! message (the reason) gets what is left, cut before escaping, on a character boundary,
//! and marked with `…`, so neither an entity nor a character is ever cut in half.

use super::facts::{Affected, Cause, Facts, Scope};
use super::{Alert, AlertKind};

/// Telegram's limit on a message's text.
pub const TELEGRAM_MAX_UTF16: usize = 4096;
/// Longest deployment, operator or process name, trigger or scope shown.
const NAME_CHARS: usize = 100;
/// Longest secondary text shown: an incident's title, the reason of the kill a resume ends.
const LINE_CHARS: usize = 300;
/// Tasks listed one by one; more are counted.
const TASKS_SHOWN: usize = 10;

/// A piece of a line.
enum Piece {
    /// Text, escaped in HTML.
    Text(String),
    /// Text in bold.
    Bold(String),
    /// A command, in `<code>` (tap to copy on a phone).
    Code(String),
    /// The message's one long value: as much of it as fits.
    Long(String),
    /// ` (3 min ago)`: only in the Telegram message, which is rendered when it is sent.
    Age,
}

/// A line: `Label: pieces`, or the title (no label).
struct Line {
    label: Option<String>,
    pieces: Vec<Piece>,
}

fn line(label: &str, pieces: Vec<Piece>) -> Line {
    Line { label: Some(label.to_owned()), pieces }
}

fn text(s: impl Into<String>) -> Piece {
    Piece::Text(s.into())
}

/// `value` with control characters (newlines included) as spaces, cut to `max` characters
/// with `…`.
fn clip(value: &str, max: usize) -> String {
    let clean: String = value.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if clean.chars().count() <= max {
        return clean;
    }
    let mut cut: String = clean.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn name(value: &str) -> String {
    clip(value, NAME_CHARS)
}

/// `2026-12-02 17:30:05 UTC`.
pub fn utc(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64).unwrap_or_default().format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// RFC 3339 with milliseconds, UTC: `2026-12-02T17:30:05.123Z`.
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A duration for people: `45 s`, `3 min`, `2 h 5 min`, `3 days`.
pub fn span(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..172_800 => match (secs / 3600, secs % 3600 / 60) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
        _ => format!("{} days", secs / 86_400),
    }
}

/// How long before `now_ms` `at_ms` was: `just now` (under a minute, or in the future by a
/// skewed clock), `3 min ago`, `2 h 5 min ago`.
pub fn age(at_ms: u64, now_ms: u64) -> String {
    let d = now_ms.saturating_sub(at_ms);
    if d < 60_000 { "just now".to_owned() } else { format!("{} ago", span(d)) }
}

/// `812400` as `812,400`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A trigger's name in words: `daily_budget` → `daily budget`.
fn trigger_words(trigger: &str) -> String {
    match trigger {
        "soft_limit" => "role soft limit".to_owned(),
        "" => "unknown trigger".to_owned(),
        other => name(&other.replace('_', " ")),
    }
}

/// Who or what: `alice (operator, via orchestrator-0)`, `an operator via orchestrator-0
/// (name not passed on)`, `orchestrator-0 (the orchestrator itself, no operator named)`,
/// `budget-0, automatically (daily budget)`.
fn who(cause: &Cause) -> String {
    let via = cause.via.as_deref().map(name);
    match (&cause.operator, via) {
        (Some(person), Some(via)) => format!("{} (operator, via {via})", name(person)),
        (Some(person), None) => format!("{} (operator)", name(person)),
        (None, Some(via)) if cause.is_operator() => format!("an operator via {via} (name not passed on)"),
        (None, None) if cause.is_operator() => "an operator (name not passed on)".to_owned(),
        // A record written before causes were kept: its `by` is all there is.
        (None, Some(via)) if cause.trigger.is_empty() => via,
        (None, Some(via)) if cause.trigger == super::facts::ORCHESTRATOR_TRIGGER => {
            format!("{via} (the orchestrator itself, no operator named)")
        }
        (None, Some(via)) => format!("{via}, automatically ({})", trigger_words(&cause.trigger)),
        (None, None) => format!("automatically ({})", trigger_words(&cause.trigger)),
    }
}

/// Who, shorter, for the kill a resume ends: `alice`, `an operator`, `daily budget`.
fn who_short(cause: &Cause) -> String {
    match &cause.operator {
        Some(person) => name(person),
        None if cause.is_operator() => "an operator".to_owned(),
        None => trigger_words(&cause.trigger),
    }
}

fn affected(a: &Affected) -> String {
    let mut parts = Vec::new();
    match a.tasks_halted {
        Scope::All => parts.push("every open task halted".to_owned()),
        Scope::Tasks => parts.push(format!("{} task(s) halted", a.tasks.len())),
        Scope::None => {}
    }
    match a.merges_frozen {
        Scope::All => parts.push("all merges frozen".to_owned()),
        Scope::Tasks => parts.push("merges of these tasks frozen".to_owned()),
        Scope::None => {}
    }
    if let Some(repo) = &a.frozen_repository {
        parts.push(format!("merges to {} frozen", name(repo)));
    }
    if !a.roles_paused.is_empty() {
        let roles: Vec<String> = a.roles_paused.iter().map(|r| name(r)).collect();
        parts.push(format!("{} paused", roles.join(", ")));
    }
    if parts.is_empty() { "nothing stopped".to_owned() } else { parts.join("; ") }
}

fn tasks(ids: &[uuid::Uuid]) -> String {
    let mut shown: Vec<String> = ids.iter().take(TASKS_SHOWN).map(ToString::to_string).collect();
    if ids.len() > TASKS_SHOWN {
        shown.push(format!("and {} more", ids.len() - TASKS_SHOWN));
    }
    shown.join(", ")
}

/// The lines of `alert`'s message.
fn lines(alert: &Alert) -> Vec<Line> {
    let f: &Facts = &alert.facts;
    let deployment = name(&f.deployment);
    let mut out = Vec::new();
    let title = |icon: &str, what: String, rest: Option<String>| {
        let mut pieces =
            vec![text(format!("{icon} ")), Piece::Bold(what), text(" on "), Piece::Bold(deployment.clone())];
        if let Some(rest) = rest {
            pieces.push(text(format!(": {rest}")));
        }
        Line { label: None, pieces }
    };
    let when = line("When", vec![text(utc(f.occurred_at_ms)), Piece::Age]);
    match alert.kind {
        AlertKind::KillEngaged => {
            out.push(title("🛑", "KILL SWITCH ENGAGED".into(), None));
            out.push(when);
            out.push(line("By", vec![text(who(&f.cause))]));
            out.push(line("Why", vec![Piece::Long(f.cause.reason.clone())]));
            out.push(line("Affected", vec![text(affected(&f.affected))]));
        }
        AlertKind::Resumed => {
            out.push(title("✅", "Fleet resumed".into(), None));
            out.push(when);
            out.push(line("By", vec![text(who(&f.cause))]));
            if let Some(kill) = &f.ends {
                let lasted = f.occurred_at_ms.saturating_sub(kill.at_ms);
                out.push(line(
                    "Ends",
                    vec![
                        text(format!(
                            "the kill of {} (lasted {}) by {}: ",
                            utc(kill.at_ms),
                            span(lasted),
                            who_short(&kill.cause)
                        )),
                        Piece::Long(kill.cause.reason.clone()),
                    ],
                ));
            }
            out.push(line(
                "Affected",
                vec![text("halted tasks re-issued at their current step; merges allowed again")],
            ));
        }
        AlertKind::SoftLimitWarning => {
            out.push(title("⚠️", "Soft limit reached".into(), f.scope.as_deref().map(name)));
            out.push(when);
            out.push(line("By", vec![text(who(&f.cause))]));
            out.push(line("What", vec![Piece::Long(f.cause.reason.clone())]));
            out.push(line("Affected", vec![text("nothing stopped yet")]));
        }
        AlertKind::Incident => {
            let (what, title_text) = match &f.incident {
                Some(i) => (format!("INCIDENT {}", i.severity.shout()), Some(clip(&i.title, LINE_CHARS))),
                None => ("INCIDENT".to_owned(), None),
            };
            out.push(title("🚨", what, title_text));
            out.push(when);
            out.push(line("By", vec![text(who(&f.cause))]));
            if !f.cause.reason.is_empty() {
                out.push(line("Why", vec![Piece::Long(f.cause.reason.clone())]));
            }
            if !f.affected.tasks.is_empty() {
                out.push(line("Tasks", vec![text(tasks(&f.affected.tasks))]));
            }
            out.push(line("Affected", vec![text(affected(&f.affected))]));
        }
    }
    for action in &f.actions {
        // Labels are this crate's own words; commands its own too (ids are UUIDs).
        out.push(line(&action.label, vec![Piece::Code(action.command.clone())]));
    }
    out
}

/// The plain text of `alert` (no markup, no age): the alert's stored `text`.
pub fn plain(alert: &Alert) -> String {
    let mut out = String::new();
    for (i, l) in lines(alert).iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if let Some(label) = &l.label {
            out.push_str(label);
            out.push_str(": ");
        }
        for p in &l.pieces {
            match p {
                Piece::Text(s) | Piece::Bold(s) | Piece::Code(s) => out.push_str(s),
                Piece::Long(s) => out.push_str(&clip(s, usize::MAX)),
                Piece::Age => {}
            }
        }
    }
    out
}

/// `c` escaped for Telegram's HTML.
fn escape_char(c: char, out: &mut String) {
    match c {
        '<' => out.push_str("&lt;"),
        '>' => out.push_str("&gt;"),
        '&' => out.push_str("&amp;"),
        '"' => out.push_str("&quot;"),
        c => out.push(c),
    }
}

/// `s` escaped for Telegram's HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    s.chars().for_each(|c| escape_char(c, &mut out));
    out
}

fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// As much of `s` (control characters as spaces), escaped, as fits in `budget` UTF-16
/// units, with `…` when cut. Cut between characters, before escaping.
fn escape_within(s: &str, budget: usize) -> String {
    let clean = clip(s, usize::MAX);
    let whole = escape(&clean);
    if utf16_len(&whole) <= budget {
        return whole;
    }
    let mut out = String::new();
    let mut used = 0;
    let mut one = String::new();
    for c in clean.chars() {
        one.clear();
        escape_char(c, &mut one);
        let n = utf16_len(&one);
        // Room for this character and the closing `…` (one unit).
        if used + n + 1 > budget {
            break;
        }
        out.push_str(&one);
        used += n;
    }
    if budget > used {
        out.push('…');
    }
    out
}

fn html_with(lines: &[Line], long_budget: usize, now_ms: u64, occurred_at_ms: u64) -> String {
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if let Some(label) = &l.label {
            out.push_str("<b>");
            out.push_str(&escape(label));
            out.push_str(":</b> ");
        }
        for p in &l.pieces {
            match p {
                Piece::Text(s) => out.push_str(&escape(s)),
                Piece::Bold(s) => {
                    out.push_str("<b>");
                    out.push_str(&escape(s));
                    out.push_str("</b>");
                }
                Piece::Code(s) => {
                    out.push_str("<code>");
                    out.push_str(&escape(s));
                    out.push_str("</code>");
                }
                Piece::Long(s) => out.push_str(&escape_within(s, long_budget)),
                Piece::Age => {
                    out.push_str(" (");
                    out.push_str(&age(occurred_at_ms, now_ms));
                    out.push(')');
                }
            }
        }
    }
    out
}

/// `alert` as a Telegram message with `parse_mode: HTML`, as of `now_ms` (for the age), at
/// most [`TELEGRAM_MAX_UTF16`] UTF-16 units long, markup included.
///
/// An alert queued by an older `budget` (no deployment in its facts) is sent as its stored
/// text, escaped.
pub fn telegram_html(alert: &Alert, now_ms: u64) -> String {
    if alert.facts.deployment.is_empty() {
        return escape_within(&alert.text, TELEGRAM_MAX_UTF16);
    }
    let lines = lines(alert);
    let occurred = alert.facts.occurred_at_ms;
    let base = utf16_len(&html_with(&lines, 0, now_ms, occurred));
    html_with(&lines, TELEGRAM_MAX_UTF16.saturating_sub(base), now_ms, occurred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_ages_and_numbers() {
        let at = 1_796_232_605_000; // 2026-12-02 17:30:05 UTC
        assert_eq!(utc(at), "2026-12-02 17:30:05 UTC");
        assert_eq!(rfc3339(at + 123), "2026-12-02T17:30:05.123Z");
        assert_eq!(age(at, at + 59_999), "just now");
        assert_eq!(age(at, at.saturating_sub(5_000)), "just now", "a clock behind");
        assert_eq!(age(at, at + 3 * 60_000 + 10_000), "3 min ago");
        assert_eq!(age(at, at + 2 * 3_600_000 + 5 * 60_000), "2 h 5 min ago");
        assert_eq!(age(at, at + 3 * 86_400_000), "3 days ago");
        assert_eq!(span(12 * 60_000), "12 min");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(812_400), "812,400");
        assert_eq!(thousands(1_234_567_890), "1,234,567,890");
    }

    #[test]
    fn names_who_or_what_did_it() {
        let via = "orchestrator-0";
        assert_eq!(who(&Cause::operator(Some("alice"), via, "x")), "alice (operator, via orchestrator-0)");
        assert_eq!(who(&Cause::operator(Some("  "), via, "x")), "an operator via orchestrator-0 (name not passed on)");
        assert_eq!(
            who(&Cause::automatic(super::super::facts::ORCHESTRATOR_TRIGGER, via, "x")),
            "orchestrator-0 (the orchestrator itself, no operator named)"
        );
        assert_eq!(
            who(&Cause::automatic("consecutive_failures", "budget-0", "x")),
            "budget-0, automatically (consecutive failures)"
        );
        let old = Cause { via: Some("budget".into()), ..Cause::default() };
        assert_eq!(who(&old), "budget", "a record from before causes were kept");
        assert_eq!(who_short(&Cause::operator(None, via, "")), "an operator");
        assert_eq!(who_short(&Cause::automatic("daily_budget", "budget-0", "")), "daily budget");
    }

    #[test]
    fn escapes_what_html_needs_and_nothing_else() {
        assert_eq!(escape("<script>alert(1)</script>"), "&lt;script&gt;alert(1)&lt;/script&gt;");
        assert_eq!(escape(r#"_*[]()~`>#+-=|{}.!"&'"#), r#"_*[]()~`&gt;#+-=|{}.!&quot;&amp;'"#);
        assert_eq!(clip("a\nBy: admin\r\tb", 100), "a By: admin  b");
        assert_eq!(clip("abcdef", 4), "abc…");
    }

    #[test]
    fn escape_within_never_cuts_an_entity_or_a_character() {
        let s = "&<>\"é🦀".repeat(50);
        for budget in 0..200 {
            let out = escape_within(&s, budget);
            assert!(utf16_len(&out) <= budget, "{budget}: {out}");
            let body = out.trim_end_matches('…');
            // Whole entities only: removing them leaves none of & < > ".
            let rest = body.replace("&amp;", "").replace("&lt;", "").replace("&gt;", "").replace("&quot;", "");
            assert!(!rest.contains(['&', '<', '>', '"']), "{budget}: {out}");
        }
        assert_eq!(escape_within("a<b", 100), "a&lt;b");
        assert_eq!(escape_within("a<b", 6), "a&lt;b", "exactly fits");
        assert_eq!(escape_within("a<bc", 5), "a…", "`&lt;` and `…` need five units after `a`");
        assert_eq!(escape_within("a<bc", 6), "a&lt;…");
    }
}
