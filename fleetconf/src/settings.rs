//! The settings a binary accepts, found by asking its own loader, and the check that keeps
//! `docs/deployment.md`'s settings tables complete: each binary's tests call
//! [`undocumented`] with what [`discover`] found.
//!
//! [`discover`] gives the loader small TOML documents with an unknown key, [`PROBE`], in
//! one table at a time. A table refuses it and names the keys it knows (every settings
//! struct is `deny_unknown_fields`, and [`crate::ConfigError`] lists the known keys); a key
//! whose own probe names none is a setting (a value, a list or a map of free keys). An
//! internally tagged table (`[tools.provider]` with `kind = …`) answers with its missing
//! tag instead: the tag's variants are read from the refusal of an unknown one, and each
//! variant's keys are probed in turn. No probe ever loads successfully (each holds the
//! unknown key), so no file a setting names is opened.

use std::collections::BTreeSet;

/// The unknown key every probe carries. It sorts before every real key, so a table meets it
/// first and refuses it before anything else (a missing required key, say) can fail.
pub const PROBE: &str = "__probe";

/// Every setting `load` accepts, as dotted keys (`sandbox.memory_bytes`). `load` loads the
/// TOML document it is given through the binary's real loader (write it to a file, call
/// `Config::load(Some(path), &Env::default())`) and returns the error's message, or `None`
/// when the document loaded.
pub fn discover(load: &dyn Fn(&str) -> Option<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    walk(load, "", "", &mut found);
    found
}

/// Probes `table` (after `prefix`, the lines that must precede it); records its keys in
/// `found`. False when `table` is no table: then it is a setting itself.
fn walk(load: &dyn Fn(&str) -> Option<String>, prefix: &str, table: &str, found: &mut BTreeSet<String>) -> bool {
    let header = if table.is_empty() { String::new() } else { format!("[{table}]\n") };
    let Some(refusal) = load(&format!("{prefix}{header}{PROBE} = 1\n")) else { return false };
    if let Some(keys) = known_keys(&refusal) {
        for key in keys {
            let dotted = join(table, &key);
            if !walk(load, prefix, &dotted, found) {
                found.insert(dotted);
            }
        }
        return true;
    }
    // An internally tagged table buffers its keys and asks for its tag first.
    let Some(tag) = missing_key_of(&refusal, table) else { return false };
    found.insert(join(table, &tag));
    let Some(refusal) = load(&format!("{prefix}{header}{tag} = \"{PROBE}\"\n")) else { return true };
    for variant in variants(&refusal) {
        let with_tag = format!("{prefix}{header}{tag} = \"{variant}\"\n");
        let Some(refusal) = load(&format!("{with_tag}{PROBE} = 1\n")) else { continue };
        for key in known_keys(&refusal).unwrap_or_default() {
            let dotted = join(table, &key);
            // The variant's sub-tables are probed below the tagged table's own lines.
            if !walk(load, &with_tag, &dotted, found) {
                found.insert(dotted);
            }
        }
    }
    true
}

fn join(table: &str, key: &str) -> String {
    if table.is_empty() { key.to_owned() } else { format!("{table}.{key}") }
}

/// `… (known in `sandbox`: image, runtime, …)` → the keys.
fn known_keys(message: &str) -> Option<Vec<String>> {
    let start = message.find("(known")?;
    let rest = &message[start..];
    let list = &rest[rest.find(": ")? + 2..rest.find(')')?];
    Some(if list == "none" { Vec::new() } else { list.split(", ").map(str::to_owned).collect() })
}

/// `setting `<table>.<key>` is missing` → the key, when it is directly in `table`.
fn missing_key_of(message: &str, table: &str) -> Option<String> {
    let lead = format!("setting `{}", if table.is_empty() { String::new() } else { format!("{table}.") });
    let rest = &message[message.find(&lead)? + lead.len()..];
    let key = &rest[..rest.find("` is missing")?];
    (!key.is_empty() && !key.contains('.')).then(|| key.to_owned())
}

/// `… expected one of openai, anthropic, scripted` → the variants.
fn variants(message: &str) -> Vec<String> {
    let Some(start) = message.find("expected one of ") else { return Vec::new() };
    let list = &message[start + "expected one of ".len()..];
    let list = list.split([';', '\n']).next().unwrap_or_default();
    list.split(", ").map(|v| v.trim().trim_matches('`').to_owned()).filter(|v| !v.is_empty()).collect()
}

/// What is wrong with the settings table of `binary` in `doc` (empty when nothing is):
/// the table is the rows between the lines `<!-- settings: BINARY -->` and
/// `<!-- /settings -->`. Each row starts with a setting's dotted key in backticks and names
/// its variable (`FLEET_SANDBOX__MEMORY_BYTES`) in backticks; a secret's row names
/// `FLEET_<KEY>_FILE` too. Every one of `settings` needs a row, and every row must be one
/// of `settings`.
pub fn undocumented(doc: &str, binary: &str, settings: &BTreeSet<String>, secrets: &[&str]) -> Vec<String> {
    let open = format!("<!-- settings: {binary} -->");
    let Some(start) = doc.find(&open) else {
        return vec![format!("no `{open}` line: the settings table of {binary} is missing")];
    };
    let body = &doc[start + open.len()..];
    let Some(end) = body.find("<!-- /settings -->") else {
        return vec![format!("the settings table of {binary} has no closing `<!-- /settings -->` line")];
    };
    let mut problems = Vec::new();
    let mut rows = BTreeSet::new();
    for row in body[..end].lines().filter(|l| l.starts_with("| `")) {
        let key = row[3..].split('`').next().unwrap_or_default().to_owned();
        if !settings.contains(&key) {
            problems.push(format!("{binary}: the row of `{key}` names no setting of {binary}"));
            continue;
        }
        if !rows.insert(key.clone()) {
            problems.push(format!("{binary}: `{key}` has two rows"));
        }
        let variable = crate::Env::variable_of(&key);
        if !row.contains(&format!("`{variable}`")) {
            problems.push(format!("{binary}: the row of `{key}` does not name `{variable}`"));
        }
        if secrets.contains(&key.as_str()) && !row.contains(&format!("`{variable}_FILE`")) {
            problems.push(format!("{binary}: `{key}` is a secret; its row does not name `{variable}_FILE`"));
        }
    }
    for key in settings.difference(&rows) {
        problems.push(format!("{binary}: setting `{key}` has no row in docs/deployment.md"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        name: String,
        url: Option<String>,
        #[serde(default)]
        limits: Limits,
        #[serde(default)]
        caps: std::collections::BTreeMap<String, u64>,
        provider: Option<Provider>,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    #[allow(dead_code)]
    struct Limits {
        memory: u64,
        inner: Inner,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        depth: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(tag = "kind", rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Provider {
        Remote(Remote),
        Local(Local),
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Remote {
        base_url: String,
        #[serde(default)]
        headers: std::collections::BTreeMap<String, String>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Local {
        fixture: String,
    }

    fn load(text: &str) -> Option<String> {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        let env = crate::Env::default();
        crate::Layers::new(Some(file.path()), &env, &["url"]).extract::<File>().err().map(|e| e.0)
    }

    #[test]
    fn every_key_is_found_through_the_loader() {
        let found: Vec<String> = discover(&load).into_iter().collect();
        assert_eq!(
            found,
            [
                "caps",
                "limits.inner.depth",
                "limits.memory",
                "name",
                "provider.base_url",
                "provider.fixture",
                "provider.headers",
                "provider.kind",
                "url"
            ]
        );
    }

    #[test]
    fn the_table_must_list_every_setting_with_its_variables() {
        let settings: BTreeSet<String> = ["name", "url"].map(str::to_owned).into();
        let good = "<!-- settings: x -->\n| `name` | `FLEET_NAME` | required |\n\
                    | `url` | `FLEET_URL`, `FLEET_URL_FILE` | none |\n<!-- /settings -->\n";
        assert_eq!(undocumented(good, "x", &settings, &["url"]), Vec::<String>::new());
        let bad = "<!-- settings: x -->\n| `name` | FLEET_NAME |\n| `url` | `FLEET_URL` |\n\
                   | `old` | `FLEET_OLD` |\n<!-- /settings -->\n";
        assert_eq!(
            undocumented(bad, "x", &settings, &["url"]),
            [
                "x: the row of `name` does not name `FLEET_NAME`",
                "x: `url` is a secret; its row does not name `FLEET_URL_FILE`",
                "x: the row of `old` names no setting of x",
            ]
        );
        let missing = "<!-- settings: x -->\n| `name` | `FLEET_NAME` |\n<!-- /settings -->\n";
        assert_eq!(undocumented(missing, "x", &settings, &[]), ["x: setting `url` has no row in docs/deployment.md"]);
        assert_eq!(undocumented("", "x", &settings, &[]).len(), 1);
    }
}
