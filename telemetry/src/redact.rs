//! The fleet's one redaction set: every pattern of a secret that must never reach a log, an
//! API answer, the audit trail, a stored worker summary or an alert, and the functions
//! that apply it. Whatever shows or keeps free text calls [`redact`] (or [`redact_json`]
//! for structured values); nothing keeps a list of its own.
//!
//! It is a second net behind the `Secret` types: those keep the fleet's own credentials
//! out of text; this catches credentials that arrive *inside* text (a model's answer, a
//! repository's file quoted in a summary, an operator's reason, a library's error).
//!
//! All patterns are one regular expression, compiled once: a text without a secret costs
//! one scan, and [`redact`] hands it back borrowed, without a copy.
//!
//! Patterns that follow a prefix (`ghp_`, `AKIA`, `sk-`, …) need a boundary before the
//! prefix so `task-…` is not taken for `sk-…`; the boundary also accepts an escape such as
//! `\n` or `\t`, because JSON logs and `Debug` output write a newline inside a string as
//! a backslash and an `n`, and a secret right after it must still be caught.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Captures, Regex};
use serde_json::Value;

/// What a secret is replaced with.
pub const REDACTED: &str = "**REDACTED**";

/// One kind of secret: `lead` and `trail` are kept around the replaced `secret`. Each is a
/// regular expression without capture groups of its own.
struct Pattern {
    lead: &'static str,
    secret: &'static str,
    trail: &'static str,
}

/// Start of text, a character that is not a letter or digit, or a backslash escape.
const BOUNDARY: &str = r#"^|[^A-Za-z0-9]|\\[a-z]"#;

/// Names of settings whose value is a secret, in `key=value`, `key: value` and JSON form.
const SECRET_SETTING: &str = r#"(?i:password|passwd|pwd|(?:aws_?)?secret_?access_?key|aws_?secret_?key|client_?secret|api_?key|access_?token|refresh_?token|auth_?token)"#;

/// An unquoted value: up to a space, a quote, a separator or a backslash escape, and not
/// ending in a full stop or a closing bracket (`password=x.` ends a sentence).
const VALUE: &str = r#"[^\s;&,"'\\]*[^\s;&,"'\\.)\]}]"#;

/// The set, in priority order for matches starting at the same place.
const PATTERNS: &[Pattern] = &[
    // Any PEM or OpenSSH private key block, over any number of lines; a block cut before
    // its END line is redacted as far as it looks like one (base64, line breaks, escaped
    // ones, PEM header punctuation).
    Pattern {
        lead: "",
        secret: r#"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:[^"]*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|(?:[A-Za-z0-9+/=\r\n:,-]|\\[nrt])*)"#,
        trail: "",
    },
    // `Authorization:` (and `Proxy-Authorization:`) headers: Bearer, Basic, token, … or a
    // bare credential; as a header, a JSON member or a `key=value` field.
    Pattern {
        lead: r#"(?i:authorization)\\?["']?\s*[:=]\s*(?:\\?["'])?(?:(?i:bearer|basic|token|bot|digest|negotiate|apikey)\s+)?"#,
        secret: VALUE,
        trail: "",
    },
    // Other credential headers.
    Pattern {
        lead: r#"(?i:x-api-key|api-key|x-auth-token|private-token|x-goog-api-key)\\?["']?\s*[:=]\s*(?:\\?["'])?"#,
        secret: VALUE,
        trail: "",
    },
    // A bearer token outside a header (`curl -H "…"`, an error quoting one).
    Pattern { lead: r"(?i:bearer)\s+", secret: r"[A-Za-z0-9._~+/-]{16,}=*", trail: "" },
    // JWTs: capability leases, operator tokens, OIDC tokens (`alg: none` has no signature).
    Pattern { lead: "", secret: r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*", trail: "" },
    // The password of a URL, any scheme, any case: `postgres://u:pw@h`, `REDIS://:pw@h`.
    // The password runs to the last `@` before a space, a slash or a quote.
    Pattern { lead: r#"(?i:[a-z][a-z0-9+.-]*)://[^:/@\s"\\]*:"#, secret: r#"(?:[^\s/"\\]|\\")+"#, trail: "@" },
    // `password=…` and the like, quoted (the quotes kept, also JSON-escaped ones) or bare.
    Pattern { lead: r#"SETTING\\?["']?\s*[=:]\s*\\""#, secret: r#"(?:[^"\\]|\\[^"])*"#, trail: r#"\\""# },
    Pattern { lead: r#"SETTING\\?["']?\s*[=:]\s*""#, secret: r#"(?:[^"\\]|\\.)*"#, trail: "\"" },
    Pattern { lead: r#"SETTING\\?["']?\s*[=:]\s*'"#, secret: r"[^']*", trail: "'" },
    Pattern { lead: r#"SETTING\\?["']?\s*[=:]\s*"#, secret: VALUE, trail: "" },
    // AWS access key ids (long-term AKIA, temporary ASIA), with the secret key when it
    // stands right beside the id (`AKIA…:secret`, `AKIA… secret`).
    Pattern {
        lead: BOUNDARY,
        secret: r#"(?:AKIA|ASIA)[0-9A-Z]{16}(?:[\s:,;|"'=\\]{1,6}[A-Za-z0-9/+]{40})?"#,
        trail: "",
    },
    // GitHub: personal, OAuth, server, user-to-server and refresh tokens, fine-grained PATs.
    Pattern { lead: BOUNDARY, secret: r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})", trail: "" },
    // GitLab: personal, deploy, runner, pipeline-trigger, feed tokens.
    Pattern { lead: BOUNDARY, secret: r"gl(?:pat|dt|rt|ptt|ft|soat|cbt)-[A-Za-z0-9_-]{20,}", trail: "" },
    // Slack: bot, user, app-level and legacy tokens.
    Pattern { lead: BOUNDARY, secret: r"(?:xox[abposer]|xapp)-[A-Za-z0-9-]{10,}", trail: "" },
    // Model provider keys (OpenAI `sk-…`, `sk-proj-…`, Anthropic `sk-ant-…`), Stripe keys.
    Pattern { lead: BOUNDARY, secret: r"(?:sk-[A-Za-z0-9_-]{16,}|[rs]k_(?:live|test)_[A-Za-z0-9]{16,})", trail: "" },
    // Telegram bot tokens, `<bot id>:<35 characters>`, also inside `…/bot<token>/…`.
    Pattern { lead: r"^|[^A-Za-z0-9]|\\[a-z]|bot", secret: r"[0-9]{6,12}:[A-Za-z0-9_-]{30,}", trail: "" },
];

/// The compiled set: one alternative per pattern, `(lead)secret(trail)`, so pattern `i`
/// owns capture groups `2i + 1` (lead) and `2i + 2` (trail).
static SET: LazyLock<Regex> = LazyLock::new(|| {
    let alternatives: Vec<String> = PATTERNS
        .iter()
        .map(|p| format!("(?:({}){}({}))", p.lead.replace("SETTING", SECRET_SETTING), p.secret, p.trail))
        .collect();
    Regex::new(&alternatives.join("|")).expect("the redaction patterns are valid")
});

/// `text` with every secret replaced by [`REDACTED`]; borrowed, without a copy, when there
/// is none.
pub fn redact(text: &str) -> Cow<'_, str> {
    SET.replace_all(text, |caps: &Captures<'_>| {
        // The one alternative that matched is the one whose lead group took part.
        let i = (0..PATTERNS.len()).find(|i| caps.get(2 * i + 1).is_some()).unwrap_or(0);
        let part = |g: usize| caps.get(g).map_or("", |m| m.as_str());
        format!("{}{REDACTED}{}", part(2 * i + 1), part(2 * i + 2))
    })
}

/// Redacts `text` where it is, allocating only when it holds a secret.
pub fn redact_string(text: &mut String) {
    if let Cow::Owned(clean) = redact(text) {
        *text = clean;
    }
}

/// Object keys whose values never leave a process, whatever they look like.
const SECRET_KEYS: [&str; 7] = ["secret", "password", "token", "lease", "api_key", "authorization", "key"];

/// Redacts a structured value at any depth: the value under a secret-looking key
/// (`password`, `token`, `…_secret`, `…_key`, …) is replaced whole, and every other string
/// goes through [`redact`].
pub fn redact_json(value: &mut Value) {
    match value {
        Value::String(s) => redact_string(s),
        Value::Array(items) => items.iter_mut().for_each(redact_json),
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let lower = k.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|s| lower == *s || lower.ends_with(&format!("_{s}"))) {
                    *v = Value::String(REDACTED.into());
                } else {
                    redact_json(v);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use fleet_testkit::secrets::SAMPLES;

    #[test]
    fn every_sample_is_redacted_exactly() {
        for s in SAMPLES {
            assert_eq!(redact(s.text), s.redacted, "{}", s.name);
            assert!(!redact(s.text).contains(s.secret), "{} leaked", s.name);
        }
    }

    #[test]
    fn every_sample_is_redacted_after_an_escape_and_inside_json() {
        for s in SAMPLES {
            for before in ["\n", "\t", "\r\n", " "] {
                let text = format!("done:{before}{}", s.text);
                assert_eq!(redact(&text), format!("done:{before}{}", s.redacted), "{} after {before:?}", s.name);
                // As a JSON log writes it: the escape is a backslash and a letter.
                let json = serde_json::to_string(&text).unwrap();
                let back: String = serde_json::from_str(&redact(&json)).unwrap();
                assert_eq!(back, format!("done:{before}{}", s.redacted), "{} in JSON after {before:?}", s.name);
            }
        }
    }

    #[test]
    fn redacting_a_json_string_keeps_it_json() {
        // A quote or a backslash right after a secret is JSON-escaped; the redaction must
        // neither swallow half an escape nor run past the string's end.
        for s in SAMPLES {
            for after in ["\" and \\ end", "\\\" end", "\u{1b}[0m end"] {
                let json = serde_json::to_string(&format!("{}{after}", s.text)).unwrap();
                let back: String = serde_json::from_str(&redact(&json))
                    .unwrap_or_else(|e| panic!("{}: {e} in {}", s.name, redact(&json)));
                assert!(back.starts_with(s.redacted), "{}: {back}", s.name);
                assert!(back.ends_with(" end") && !back.contains(s.secret), "{}: {back}", s.name);
            }
        }
    }

    #[test]
    fn text_without_a_secret_is_kept_and_not_copied() {
        for text in [
            "task-0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f moved to qa after risk-assessment",
            "listening on http://127.0.0.1:8080/v1/tasks, by=olga@example.com",
            "WWW-Authenticate: Bearer realm=\"agentfleet\"; send a bearer token",
            "pytest -q passed 14 tests; input_tokens=1200 output_tokens=300",
            "git@github.com:org/repo.git and ssh://git@host/repo",
        ] {
            assert!(matches!(redact(text), Cow::Borrowed(t) if t == text), "{text} changed to {}", redact(text));
        }
    }

    #[test]
    fn json_values_under_secret_keys_and_secrets_in_strings_are_redacted() {
        let mut v = serde_json::json!({
            "token": "opaque", "db_password": 5, "reason": "leaked ghp_0123456789abcdefghijABCDEFGHIJ0123",
            "nested": [{"text": "use postgres://app:hunter2@db/app"}], "tokens": 12,
        });
        redact_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({
                "token": REDACTED, "db_password": REDACTED, "reason": "leaked **REDACTED**",
                "nested": [{"text": "use postgres://app:**REDACTED**@db/app"}], "tokens": 12,
            })
        );
    }
}
