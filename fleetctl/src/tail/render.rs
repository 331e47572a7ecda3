//! One stream entry as one line: verified (or labelled unverified), summarised, and made
//! safe to print on a terminal.
//!
//! Everything shown here may come from a compromised sender: free text is quoted, cut, and
//! its control characters (an ANSI escape, a carriage return, a newline) and bidi overrides
//! are written as escapes, so an entry can neither fake another line nor drive the
//! operator's terminal. Lease tokens are bearer credentials and never appear, not even cut.

use bus::names::{ENV_FIELD, fields};
use bus::reply::Entry;
use envelope::wire::decode_frame;
use envelope::{Envelope, MessageType, Payload, Status, Verifier, VerifyContext, VerifyError, streams};
use serde_json::{Value, json};

/// How much of a free-text field (a result's summary, a question) a line shows.
const TEXT_CHARS: usize = 60;
/// How much of a `fleet:rejected` / `fleet:dlq` detail a line shows.
const DETAIL_CHARS: usize = 100;
/// Longest name (action, model, reason code) shown bare; longer ones are quoted and cut.
const WORD_CHARS: usize = 64;

/// What `tail` shows for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// The entry id's millisecond part as RFC 3339 UTC; `None` for an id that isn't `<ms>-<seq>`.
    time: Option<String>,
    /// The stream entry id.
    entry: String,
    /// The stream it was read from.
    stream: String,
    /// What the envelope says about itself, when its bytes decode at all.
    shown: Option<Shown>,
    /// `ok`, a [`VerifyError::reason`] code, or (in `fleet:rejected`) the recorded reason.
    verdict: String,
    /// True when the signature and edge checks passed, so the envelope really is from the
    /// sender it names (it may still be forbidden on this stream, or expired).
    authentic: bool,
    /// Why verification failed, in the verifier's words.
    problem: Option<String>,
    /// Why the entry is in `fleet:rejected` or `fleet:dlq`.
    origin: Option<Origin>,
}

/// The envelope's own claims, already made safe to print.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shown {
    ty: MessageType,
    /// `role/instance`; both are validated names.
    sender: String,
    task_id: Option<String>,
    /// The last 8 hex digits of the task id: the random part of a UUIDv7 (its first digits
    /// are a timestamp, shared by every task created in the same minute).
    task_short: Option<String>,
    envelope_id: String,
    /// The kid the frame names (the one that verified it, when it verified).
    kid: String,
    payload: String,
}

/// The extra fields of a `fleet:rejected` or `fleet:dlq` entry, as written by the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    dead_letter: bool,
    stream: Option<String>,
    entry: Option<String>,
    group: Option<String>,
    consumer: Option<String>,
    reason: Option<String>,
    detail: Option<String>,
    deliveries: Option<String>,
    at_ms: Option<String>,
    /// The original frame's length (`env_len`); the `env` field holds at most 4096 bytes of it.
    env_len: Option<u64>,
    /// The original frame's SHA-256 (`env_sha256`).
    env_sha256: Option<String>,
    /// How many bytes of the frame the entry kept.
    kept: usize,
}

/// The verifier's judgement of one frame.
struct Judgement {
    verdict: String,
    authentic: bool,
    problem: Option<String>,
    shown: Option<Shown>,
}

impl Line {
    /// Judges `entry` of `stream` with `verifier` as of `now_ms` (kill epoch 0: tail does not
    /// know the current one, and keeps no replay state).
    pub(crate) fn of(stream: &str, entry: &Entry, verifier: &Verifier, now_ms: u64) -> Self {
        let bytes = entry.field(ENV_FIELD);
        let (judgement, origin) = match stream {
            streams::REJECTED => {
                let origin = Origin::read(entry, false);
                // Written by any consumer, about bytes that failed verification: shown as they
                // decode, never verified, and the verdict is the reason the consumer recorded.
                let shown = bytes.and_then(show_unverified);
                let verdict = origin.reason.as_deref().map_or_else(|| "unknown".to_owned(), word);
                (Judgement { verdict, authentic: false, problem: None, shown }, Some(origin))
            }
            streams::DLQ => {
                let origin = Origin::read(entry, true);
                let from = origin.stream.clone().unwrap_or_default();
                (judge(&from, bytes, verifier, now_ms), Some(origin))
            }
            _ => (judge(stream, bytes, verifier, now_ms), None),
        };
        Self {
            time: entry_time(&entry.id),
            entry: sanitize(&entry.id),
            stream: sanitize(stream),
            shown: judgement.shown,
            verdict: judgement.verdict,
            authentic: judgement.authentic,
            problem: judgement.problem,
            origin,
        }
    }

    /// `TIME ENTRY TYPE SENDER TASK VERDICT SUMMARY`, `-` for what is unknown.
    pub(crate) fn text(&self) -> String {
        let shown = self.shown.as_ref();
        let line = format!(
            "{} {} {:<14} {:<16} {:<8} {:<14} {}",
            self.time.as_deref().unwrap_or("-"),
            self.entry,
            shown.map_or("-", |s| s.ty.as_str()),
            shown.map_or("-", |s| s.sender.as_str()),
            shown.and_then(|s| s.task_short.as_deref()).unwrap_or("-"),
            self.verdict,
            self.summary(),
        );
        line.trim_end().to_owned()
    }

    /// The same as one JSON object, with the full task id, envelope id and kid.
    pub(crate) fn json(&self) -> Value {
        let shown = self.shown.as_ref();
        let mut v = json!({
            "time": self.time,
            "entry": self.entry,
            "stream": self.stream,
            "type": shown.map(|s| s.ty.as_str()),
            "sender": shown.map(|s| s.sender.as_str()),
            "task_id": shown.and_then(|s| s.task_id.as_deref()),
            "envelope_id": shown.map(|s| s.envelope_id.as_str()),
            "kid": shown.map(|s| s.kid.as_str()),
            "verdict": self.verdict,
            "authentic": self.authentic,
            "problem": self.problem,
            "summary": self.summary(),
        });
        if let (Some(o), Value::Object(map)) = (&self.origin, &mut v) {
            map.insert("origin".to_owned(), o.json());
        }
        v
    }

    /// Why the entry is where it is (for `fleet:rejected`/`fleet:dlq`), what went wrong, and
    /// the payload summary, labelled `unverified:` unless the signature checked out.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(o) = &self.origin {
            parts.push(o.explain());
        }
        if self.verdict != "ok"
            && let Some(p) = &self.problem
        {
            parts.push(sanitize(p));
        }
        match &self.shown {
            Some(s) if self.authentic => parts.push(s.payload.clone()),
            Some(s) => parts.push(format!("unverified: {}", s.payload)),
            None if self.origin.as_ref().is_some_and(|o| !o.dead_letter) => {
                parts.push("the envelope bytes do not decode".to_owned());
            }
            None => {}
        }
        parts.join("; ")
    }
}

impl Origin {
    fn read(entry: &Entry, dead_letter: bool) -> Self {
        let text = |name: &str| entry.field(name).map(|b| String::from_utf8_lossy(b).into_owned());
        Self {
            dead_letter,
            stream: text(fields::STREAM),
            entry: text(fields::ENTRY),
            group: text(fields::GROUP),
            consumer: text(fields::CONSUMER),
            reason: text(fields::REASON),
            detail: text(fields::DETAIL),
            deliveries: text(fields::DELIVERIES),
            at_ms: text(fields::AT_MS),
            env_len: text(fields::ENV_LEN).and_then(|t| t.parse().ok()),
            env_sha256: text(fields::ENV_SHA256),
            kept: entry.field(ENV_FIELD).map_or(0, <[u8]>::len),
        }
    }

    /// ` [frame of N bytes, first K kept, sha256 H]` when the side stream kept a prefix only.
    fn cut_frame(&self) -> String {
        match self.env_len {
            Some(len) if len > self.kept as u64 => {
                let hex = |h: &&str| h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
                let sha = self.env_sha256.as_deref().filter(hex).unwrap_or("?");
                format!(" [frame of {len} bytes, first {} kept, sha256 {sha}]", self.kept)
            }
            _ => String::new(),
        }
    }

    /// `rejected from S E: REASON (DETAIL)` or `dead-lettered from S E after N deliveries: DETAIL`.
    fn explain(&self) -> String {
        let name = |v: &Option<String>| v.as_deref().map_or_else(|| "?".to_owned(), word);
        let detail = self.detail.as_deref().map_or_else(|| "no detail".to_owned(), |d| cut_safe(d, DETAIL_CHARS));
        if self.dead_letter {
            format!(
                "dead-lettered from {} {} after {} deliveries: {detail}{}",
                name(&self.stream),
                name(&self.entry),
                name(&self.deliveries),
                self.cut_frame()
            )
        } else {
            format!(
                "rejected from {} {}: {} ({detail}){}",
                name(&self.stream),
                name(&self.entry),
                name(&self.reason),
                self.cut_frame()
            )
        }
    }

    fn json(&self) -> Value {
        let text = |v: &Option<String>| v.as_deref().map(|s| cut_safe(s, 1000));
        let int = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<u64>().ok());
        json!({
            "kind": if self.dead_letter { "dead_letter" } else { "rejected" },
            "stream": text(&self.stream),
            "entry": text(&self.entry),
            "group": text(&self.group),
            "consumer": text(&self.consumer),
            "reason": text(&self.reason),
            "detail": text(&self.detail),
            "deliveries": int(&self.deliveries),
            "at_ms": int(&self.at_ms),
            "env_len": self.env_len,
            "env_sha256": text(&self.env_sha256),
        })
    }
}

/// Runs every check but replay, as of `now_ms`.
fn judge(stream: &str, bytes: Option<&[u8]>, verifier: &Verifier, now_ms: u64) -> Judgement {
    let Some(bytes) = bytes else {
        return Judgement {
            verdict: "decode".to_owned(),
            authentic: false,
            problem: Some(format!("no {ENV_FIELD} field")),
            shown: None,
        };
    };
    match verifier.check(stream, bytes, VerifyContext { now_ms, kill_epoch: 0 }) {
        Ok(checked) => Judgement {
            verdict: "ok".to_owned(),
            authentic: true,
            problem: None,
            shown: Some(show(checked.envelope(), bytes)),
        },
        Err(err) => Judgement {
            verdict: err.reason().to_owned(),
            authentic: signature_checked(&err),
            problem: Some(err.to_string()),
            shown: show_unverified(bytes),
        },
    }
}

/// True when `err` comes from a check that runs after the signature and edge checks passed
/// (the verifier runs its checks in the order of [`VerifyError`]'s variants, as
/// `docs/wire-format.md` §Verification fixes): the envelope really is from the sender it
/// names, but is not allowed on this stream, or is out of its time window.
fn signature_checked(err: &VerifyError) -> bool {
    matches!(
        err,
        VerifyError::ForbiddenType { .. }
            | VerifyError::TtlTooLong { .. }
            | VerifyError::FutureDated { .. }
            | VerifyError::Expired { .. }
            | VerifyError::StaleEpoch { .. }
            | VerifyError::Replay(_)
    )
}

/// Decodes frame and body without checking anything: for display only, labelled as such.
fn unverified(bytes: &[u8]) -> Option<Envelope> {
    let frame = decode_frame(bytes).ok()?;
    Envelope::from_body_bytes(frame.body).ok()
}

fn show_unverified(bytes: &[u8]) -> Option<Shown> {
    unverified(bytes).map(|e| show(&e, bytes))
}

fn show(env: &Envelope, bytes: &[u8]) -> Shown {
    let kid = decode_frame(bytes).map_or_else(|_| "?".to_owned(), |f| cut_safe(f.kid, WORD_CHARS));
    Shown {
        ty: env.message_type(),
        sender: format!("{}/{}", env.from.role, env.from.instance),
        task_id: env.task_id.map(|t| t.to_string()),
        task_short: env.task_id.map(|t| last8(&t.simple().to_string())),
        envelope_id: env.id.to_string(),
        kid,
        payload: payload_summary(env),
    }
}

/// A few words per message type; free text quoted and cut; never the lease.
fn payload_summary(env: &Envelope) -> String {
    let mut s = match &env.payload {
        Payload::TaskAssign(a) => format!(
            "attempt={} workspace={} instructions={}",
            a.attempt,
            word(&a.workspace),
            quoted(&a.instructions, TEXT_CHARS)
        ),
        Payload::TaskResult(r) => {
            let mut s =
                format!("status={} attempt={} summary={}", status(r.status), r.attempt, quoted(&r.summary, TEXT_CHARS));
            if !r.findings.is_empty() {
                s.push_str(&format!(" findings={}", r.findings.len()));
            }
            if let Some(diff) = &r.diff {
                s.push_str(&format!(" diff={}B", diff.len()));
            }
            if let Some(log) = &r.log {
                s.push_str(&format!(" log={}B", log.len()));
            }
            // The agent's tool calls in order, a refused one marked `!`: the loop at a glance.
            if !r.calls.is_empty() {
                let shown: Vec<String> = r
                    .calls
                    .iter()
                    .take(12)
                    .map(|c| {
                        let mark = if c.verdict == envelope::CallVerdict::Refused { "!" } else { "" };
                        format!("{}{mark}", word(&c.tool))
                    })
                    .collect();
                let more = if r.calls.len() > 12 { format!(",+{}", r.calls.len() - 12) } else { String::new() };
                s.push_str(&format!(" calls={}{more}", shown.join(",")));
            }
            s
        }
        Payload::Heartbeat(h) => format!("seq={} busy={}", h.seq, h.busy),
        Payload::Question(q) => format!("text={}", quoted(&q.text, TEXT_CHARS)),
        // The input is the action's arguments; its size is enough to spot a runaway call.
        Payload::ToolRequest(r) => format!(
            "action={} request={} input={}B",
            word(&r.action),
            last8(&r.request_id.simple().to_string()),
            r.input.len()
        ),
        // Tool output can hold anything a tool returned; only its size is shown.
        Payload::ToolResponse(r) => {
            format!("ok={} request={} output={}B", r.ok, last8(&r.request_id.simple().to_string()), r.output.len())
        }
        Payload::Usage(u) => format!(
            "role={} model={} tokens={}+{} cost=${}",
            u.role,
            word(&u.model),
            u.input_tokens,
            u.output_tokens,
            usd(u.cost_micro_usd)
        ),
        Payload::Outcome(o) => {
            let mut s = format!("role={} status={}", o.role, status(o.status));
            if let Some(kind) = &o.error_kind {
                s.push_str(&format!(" error_kind={}", word(kind)));
            }
            s
        }
        Payload::ControlPause(p) => {
            let mut s = format!("epoch={} reason={}", p.epoch, quoted(&p.reason, TEXT_CHARS));
            if let Some(by) = &p.by {
                s.push_str(&format!(" by={}", quoted(by, TEXT_CHARS)));
            }
            s
        }
        Payload::ControlResume(r) => match &r.by {
            Some(by) => format!("epoch={} by={}", r.epoch, quoted(by, TEXT_CHARS)),
            None => format!("epoch={}", r.epoch),
        },
        Payload::IncidentOpened(i) => format!(
            "incident={} severity={} trigger={} freezes={} title={}",
            last8(&i.incident.simple().to_string()),
            word(&i.severity),
            word(&i.trigger),
            if i.freezes_merges { i.repository.as_deref().map_or("all".to_owned(), word) } else { "-".to_owned() },
            quoted(&i.title, TEXT_CHARS)
        ),
    };
    if env.lease.is_some() {
        // A lease is a bearer token: whoever reads it can use it. Its presence is all we say.
        s.push_str(" lease=<present>");
    }
    s
}

fn status(s: Status) -> &'static str {
    match s {
        Status::Success => "success",
        Status::Failure => "failure",
        Status::Error => "error",
    }
}

/// Micro-dollars as dollars with six decimals, in integers (no float rounding).
fn usd(micro: u64) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

fn last8(hex: &str) -> String {
    hex[hex.len().saturating_sub(8)..].to_owned()
}

/// The time of an entry id `<ms>-<seq>`.
fn entry_time(id: &str) -> Option<String> {
    let (ms, _) = id.split_once('-')?;
    ms.parse().ok().map(rfc3339_ms)
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), by Howard Hinnant's
/// `civil_from_days`, so no date crate is needed for one format.
fn rfc3339_ms(ms: u64) -> String {
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Days since 0000-03-01, in 400-year eras of 146097 days (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// A name shown bare when it is plainly one (`llm.complete`, `timeout`), else quoted.
fn word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.len() <= WORD_CHARS
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-' | b'@' | b'+'));
    if plain { s.to_owned() } else { quoted(s, WORD_CHARS) }
}

/// `"text"`, redacted ([`telemetry::redact`]: a summary, a question or instructions may
/// quote a credential), then cut to `max` characters (then `…` after the closing quote),
/// with `"` and `\` escaped and control characters written as escapes. Redacted before
/// the cut, since a secret cut in two may no longer look like one.
fn quoted(s: &str, max: usize) -> String {
    let s = telemetry::redact(s);
    let (head, more) = cut(&s, max);
    let mut out = String::with_capacity(head.len() + 4);
    out.push('"');
    for c in head.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => push_safe(&mut out, c),
        }
    }
    out.push('"');
    if more {
        out.push('…');
    }
    out
}

/// Cut to `max` characters (`…` marks a cut) with control characters escaped.
fn cut_safe(s: &str, max: usize) -> String {
    let (head, more) = cut(s, max);
    let mut out = sanitize(head);
    if more {
        out.push('…');
    }
    out
}

fn cut(s: &str, max: usize) -> (&str, bool) {
    match s.char_indices().nth(max) {
        Some((at, _)) => (&s[..at], true),
        None => (s, false),
    }
}

/// Control characters and bidi overrides written as escapes (`\u{1b}`, `\n`).
fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        push_safe(&mut out, c);
    }
    out
}

fn push_safe(out: &mut String, c: char) {
    let bidi = matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    if c.is_control() || bidi {
        out.extend(c.escape_default());
    } else {
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use envelope::{
        ControlPause, Heartbeat, Instance, Keyring, MasterFile, MasterSecret, PermissionTable, Process, Role, Sender,
        TaskResult, ToolRequest, Usage, VerifierConfig,
    };

    use super::*;

    const PERMISSIONS: &str = include_str!("../../../config/permissions.toml");
    const NOW: u64 = 1_750_000_000_000;

    #[test]
    fn free_text_is_shown_redacted_and_redacted_before_the_cut() {
        for s in fleet_testkit::secrets::SAMPLES {
            let shown = quoted(s.text, 1000);
            assert_eq!(shown, quoted(s.redacted, 1000), "{}", s.name);
            assert!(!shown.contains(s.secret), "{}: {shown}", s.name);
        }
        // Cut first, the token would be too short to look like one.
        assert_eq!(quoted("token ghp_0123456789abcdefghijABCDEFGHIJ012345", 20), r#""token **REDACTED**""#);
    }

    #[test]
    fn a_results_tool_calls_are_listed_and_a_hostile_tool_name_is_quoted() {
        let call = |tool: &str, verdict| envelope::ToolCallRecord {
            tool: tool.to_owned(),
            args: String::new(),
            verdict,
            reason: None,
            ms: 1,
        };
        let with = |calls: Vec<envelope::ToolCallRecord>| {
            let mut env = result("ok", NOW);
            if let Payload::TaskResult(r) = &mut env.payload {
                r.calls = calls;
            }
            payload_summary(&env)
        };
        let text = with(vec![
            call("search", envelope::CallVerdict::Ok),
            call("read_file", envelope::CallVerdict::Refused),
            call("x\u{1b}[2J", envelope::CallVerdict::Refused),
        ]);
        assert!(text.ends_with(r#" calls=search,read_file!,"x\u{1b}[2J"!"#), "{text}");
        let many = with((0..15).map(|_| call("list_files", envelope::CallVerdict::Ok)).collect());
        assert!(many.ends_with(",list_files,+3"), "{many}");
    }

    fn master() -> MasterFile {
        MasterFile::new(MasterSecret::from_bytes([9; 32]))
    }

    fn ring(p: Process) -> Keyring {
        Keyring::derive(&master(), p, &PermissionTable::parse(PERMISSIONS).unwrap()).unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::new(ring(Process::Operator), PermissionTable::parse(PERMISSIONS).unwrap(), VerifierConfig::default())
    }

    fn result(summary: &str, issued_at_ms: u64) -> Envelope {
        let payload = TaskResult {
            attempt: 2,
            status: Status::Failure,
            summary: summary.to_owned(),
            findings: vec!["a".into()],
            diff: Some(vec![0; 10]),
            log: None,
            change_sha256: None,
            calls: Vec::new(),
            containment: Vec::new(),
        };
        Envelope::new(
            Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() },
            Role::Orchestrator,
            issued_at_ms,
            60_000,
            0,
            payload.into(),
        )
    }

    fn entry(id: &str, pairs: &[(&str, &[u8])]) -> Entry {
        Entry {
            id: id.to_owned(),
            fields: Some(pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect()),
        }
    }

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_ms(1_735_689_600_123), "2025-01-01T00:00:00.123Z");
        assert_eq!(rfc3339_ms(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
        assert_eq!(entry_time("1735689600123-7").as_deref(), Some("2025-01-01T00:00:00.123Z"));
        assert_eq!(entry_time("garbage"), None);
    }

    #[test]
    fn hostile_text_cannot_reach_the_terminal() {
        let q = quoted("ok\u{1b}[2J\r\nfake line \"x\" \\ \u{202e}", 60);
        assert_eq!(q, r#""ok\u{1b}[2J\r\nfake line \"x\" \\ \u{202e}""#);
        assert_eq!(quoted(&"é".repeat(70), 60), format!("\"{}\"…", "é".repeat(60)));
        assert_eq!(word("llm.complete"), "llm.complete");
        assert_eq!(word("two words"), "\"two words\"");
        assert_eq!(cut_safe("a\u{7}b", 10), "a\\u{7}b");
    }

    #[test]
    fn a_valid_entry_is_ok_and_summarised() {
        let mut env = result("all tests pass", NOW - 1000);
        env.task_id = Some("0190f3c1-7a2b-7c3d-8e4f-a1b2c3d4e5f6".parse().unwrap());
        let wire = ring(Process::Role(Role::Dev)).seal(&env).unwrap();
        let line = Line::of("fleet:results", &entry("1750000000000-0", &[("env", &wire)]), &verifier(), NOW);
        assert_eq!(
            line.text(),
            "2025-06-15T15:06:40.000Z 1750000000000-0 task.result    dev/dev-1        c3d4e5f6 ok             \
             status=failure attempt=2 summary=\"all tests pass\" findings=1 diff=10B"
        );
        let j = line.json();
        assert_eq!(j["kid"], "dev>orchestrator:1");
        assert_eq!(j["task_id"], "0190f3c1-7a2b-7c3d-8e4f-a1b2c3d4e5f6");
        assert_eq!(j["authentic"], true);
        assert!(j.get("origin").is_none());
    }

    #[test]
    fn expired_entries_stay_authentic_and_forgeries_do_not() {
        let v = verifier();
        let old = ring(Process::Role(Role::Dev)).seal(&result("old", NOW - 3_600_000)).unwrap();
        let line = Line::of("fleet:results", &entry("1-0", &[("env", &old)]), &v, NOW);
        assert_eq!(line.verdict, "expired");
        assert!(line.authentic);
        assert!(line.summary().starts_with("expired ") && !line.summary().contains("unverified"), "{}", line.summary());

        let mut forged = ring(Process::Role(Role::Dev)).seal(&result("forged", NOW - 3_600_000)).unwrap();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let line = Line::of("fleet:results", &entry("1-0", &[("env", &forged)]), &v, NOW);
        assert_eq!(line.verdict, "bad_signature");
        assert!(line.summary().starts_with("bad signature; unverified: status=failure"), "{}", line.summary());

        let beat = Envelope::new(
            Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() },
            Role::Orchestrator,
            NOW,
            60_000,
            0,
            Heartbeat { seq: 3, busy: false }.into(),
        );
        let wire = ring(Process::Role(Role::Dev)).seal(&beat).unwrap();
        let line = Line::of("fleet:results", &entry("1-0", &[("env", &wire)]), &v, NOW);
        assert_eq!(line.verdict, "forbidden_type");
        assert!(line.authentic);
        assert_eq!(
            line.summary(),
            "dev may not publish heartbeat to orchestrator on \"fleet:results\"; seq=3 busy=false"
        );
    }

    #[test]
    fn missing_and_garbage_envelopes_are_decode() {
        let v = verifier();
        let line = Line::of("fleet:results", &entry("1-0", &[("other", b"x")]), &v, NOW);
        assert_eq!(
            line.text(),
            "1970-01-01T00:00:00.001Z 1-0 -              -                -        decode         no env field"
        );
        let line = Line::of("fleet:results", &entry("1-1", &[("env", b"\x1b[31mnot msgpack")]), &v, NOW);
        assert_eq!(line.verdict, "decode");
        assert!(!line.text().contains('\u{1b}'), "{}", line.text());
    }

    #[test]
    fn leases_are_never_shown() {
        let lease = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZXYifQ.c2VjcmV0LXNpZ25hdHVyZQ";
        let mut env = Envelope::new(
            Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() },
            Role::Orchestrator,
            NOW,
            60_000,
            0,
            ToolRequest {
                request_id: "0190f3c1-7a2b-7c3d-8e4f-000000000001".parse().unwrap(),
                action: "git.push_branch".into(),
                input: format!("{{\"token\":\"{lease}\"}}"),
            }
            .into(),
        );
        env.lease = Some(lease.to_owned());
        let wire = ring(Process::Role(Role::Dev)).seal(&env).unwrap();
        let line = Line::of("fleet:tool:requests", &entry("1-0", &[("env", &wire)]), &verifier(), NOW);
        let (text, json) = (line.text(), line.json().to_string());
        assert!(
            text.ends_with("ok             action=git.push_branch request=00000001 input=74B lease=<present>"),
            "{text}"
        );
        for out in [&text, &json] {
            assert!(!out.contains("eyJ") && !out.contains("c2VjcmV0"), "{out}");
        }
    }

    #[test]
    fn every_payload_has_a_summary() {
        let sender = Sender { role: Role::Orchestrator, instance: Instance::parse("orch-0").unwrap() };
        let mk = |p: Payload| Envelope::new(sender.clone(), Role::Budget, NOW, 1, 0, p);
        let usage = Usage {
            role: Role::Dev,
            model: "sonnet-4".into(),
            input_tokens: 1200,
            output_tokens: 340,
            cost_micro_usd: 12_345,
        };
        assert_eq!(payload_summary(&mk(usage.into())), "role=dev model=sonnet-4 tokens=1200+340 cost=$0.012345");
        let pause = ControlPause { epoch: 4, reason: "budget exhausted".into(), by: None };
        assert_eq!(payload_summary(&mk(pause.into())), "epoch=4 reason=\"budget exhausted\"");
        assert_eq!(payload_summary(&mk(Heartbeat { seq: 7, busy: true }.into())), "seq=7 busy=true");
    }

    #[test]
    fn rejected_entries_say_why_and_stay_unverified() {
        let wire = ring(Process::Role(Role::Dev)).seal(&result("sneaky", NOW)).unwrap();
        let e = entry(
            "5-0",
            &[
                ("stream", b"fleet:results"),
                ("entry", b"4-0"),
                ("group", b"orchestrator"),
                ("consumer", b"orch-1"),
                ("reason", b"replay"),
                ("detail", b"envelope 0190 was already seen (replay)"),
                ("at_ms", b"5"),
                ("env", &wire),
            ],
        );
        let line = Line::of("fleet:rejected", &e, &verifier(), NOW);
        assert_eq!(line.verdict, "replay");
        assert_eq!(
            line.summary(),
            "rejected from fleet:results 4-0: replay (envelope 0190 was already seen (replay)); \
             unverified: status=failure attempt=2 summary=\"sneaky\" findings=1 diff=10B"
        );
        let j = line.json();
        assert_eq!(j["origin"]["kind"], "rejected");
        assert_eq!(j["origin"]["at_ms"], 5);
        assert_eq!(j["authentic"], false);
    }

    #[test]
    fn a_rejected_entry_kept_as_a_prefix_names_its_length_and_hash() {
        let e = entry(
            "7-0",
            &[
                ("stream", b"fleet:results"),
                ("entry", b"6-0"),
                ("reason", b"too_large"),
                ("detail", b"too big"),
                ("env_len", b"4194400"),
                ("env_sha256", b"ab12"),
                ("env", &[0x93; 4096]),
            ],
        );
        let line = Line::of("fleet:rejected", &e, &verifier(), NOW);
        assert!(
            line.summary()
                .starts_with("rejected from fleet:results 6-0: too_large (too big) [frame of 4194400 bytes, first 4096 kept, sha256 ab12]"),
            "{}",
            line.summary()
        );
        assert_eq!(line.json()["origin"]["env_len"], 4194400);
    }

    #[test]
    fn dead_letters_are_verified_against_their_own_stream() {
        let wire = ring(Process::Role(Role::Dev)).seal(&result("stuck", NOW)).unwrap();
        let e = entry(
            "6-0",
            &[
                ("stream", b"fleet:results"),
                ("entry", b"3-0"),
                ("deliveries", b"5"),
                ("detail", b"failed 5 deliveries; last error: db down"),
                ("env", &wire),
            ],
        );
        let line = Line::of("fleet:dlq", &e, &verifier(), NOW);
        assert_eq!(line.verdict, "ok");
        assert_eq!(
            line.summary(),
            "dead-lettered from fleet:results 3-0 after 5 deliveries: failed 5 deliveries; last error: db down; \
             status=failure attempt=2 summary=\"stuck\" findings=1 diff=10B"
        );
    }
}
