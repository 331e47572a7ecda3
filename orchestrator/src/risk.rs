//! The risk matrix (`config/risk_matrix.toml`): each tool action's risk level, when a level
//! may run without a human, and which actions each worker role's lease may grant.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, Timelike, Utc};
use envelope::Role;
use serde::Deserialize;

use crate::state::Risk;

/// When a level runs without a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoApprove {
    /// Always (LOW).
    Always,
    /// Inside the work hours only (MEDIUM).
    WorkHours,
    /// Never: the task needs an approval (HIGH, CRITICAL).
    Never,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelFile {
    auto_approve: AutoApprove,
    #[serde(default)]
    requires: Option<String>,
    actions: Vec<String>,
    token_limit: u64,
    cost_limit_usd: f64,
    #[serde(default)]
    notification: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkHoursFile {
    start: String,
    end: String,
    #[serde(default)]
    utc_offset_minutes: i32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixFile {
    work_hours: WorkHoursFile,
    levels: BTreeMap<String, LevelFile>,
    #[serde(default)]
    grants: BTreeMap<String, Vec<String>>,
}

/// One level's rule.
#[derive(Debug, Clone)]
pub struct Level {
    /// When it runs without a human.
    pub auto_approve: AutoApprove,
    /// Who must approve (for operators' eyes).
    pub requires: Option<String>,
    /// Tokens a task of this risk may use.
    pub token_limit: u64,
    /// Money a task of this risk may spend, micro-dollars.
    pub cost_limit_micro_usd: u64,
}

/// What the policy says of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Not now, not without a human; the code and message go back to the worker.
    Deny {
        /// Machine-readable (`outside_work_hours`, `needs_approval`, `unknown_action`).
        code: &'static str,
        /// For people.
        message: String,
    },
}

/// The loaded matrix.
#[derive(Debug, Clone)]
pub struct RiskMatrix {
    levels: BTreeMap<Risk, Level>,
    action_risk: BTreeMap<String, Risk>,
    grants: BTreeMap<Role, BTreeSet<String>>,
    /// Minutes after local midnight.
    work_start: u32,
    work_end: u32,
    utc_offset_minutes: i32,
}

/// The matrix file is unusable; the message names the problem.
#[derive(Debug, thiserror::Error)]
#[error("risk matrix: {0}")]
pub struct RiskError(String);

fn risk_of(name: &str) -> Option<Risk> {
    Some(match name.to_ascii_lowercase().as_str() {
        "low" => Risk::Low,
        "medium" => Risk::Medium,
        "high" => Risk::High,
        "critical" => Risk::Critical,
        _ => return None,
    })
}

fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl RiskMatrix {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, RiskError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RiskError(format!("cannot read '{}': {e}; set `risk_matrix` to config/risk_matrix.toml", path.display()))
        })?;
        Self::parse(&text).map_err(|RiskError(m)| RiskError(format!("'{}': {m}", path.display())))
    }

    /// Parses and checks the TOML text.
    pub fn parse(text: &str) -> Result<Self, RiskError> {
        let file: MatrixFile = toml::from_str(text).map_err(|e| RiskError(e.to_string()))?;
        let mut levels = BTreeMap::new();
        let mut action_risk = BTreeMap::new();
        for (name, l) in file.levels {
            let risk = risk_of(&name).ok_or_else(|| {
                RiskError(format!("unknown level [levels.{name}]: use low, medium, high or critical"))
            })?;
            if !(0.0..=1e6).contains(&l.cost_limit_usd) {
                return Err(RiskError(format!("[levels.{name}] cost_limit_usd must be between 0 and 1000000")));
            }
            if risk >= Risk::High && l.auto_approve != AutoApprove::Never {
                return Err(RiskError(format!("[levels.{name}] must have auto_approve = \"never\"")));
            }
            for a in l.actions {
                if let Some(prev) = action_risk.insert(a.clone(), risk) {
                    return Err(RiskError(format!("action {a:?} is listed under two levels ({prev:?} and {risk:?})")));
                }
            }
            let _ = l.notification;
            levels.insert(
                risk,
                Level {
                    auto_approve: l.auto_approve,
                    requires: l.requires,
                    token_limit: l.token_limit,
                    cost_limit_micro_usd: (l.cost_limit_usd * 1e6).round() as u64,
                },
            );
        }
        for r in [Risk::Low, Risk::Medium, Risk::High, Risk::Critical] {
            if !levels.contains_key(&r) {
                return Err(RiskError(format!("level {r:?} is missing: every level needs a [levels.…] table")));
            }
        }
        let mut grants = BTreeMap::new();
        for (role, actions) in file.grants {
            let role: Role = role.parse().map_err(|_| RiskError(format!("[grants] names an unknown role {role:?}")))?;
            if !role.is_worker() {
                return Err(RiskError(format!("[grants] {role}: only worker roles get leases")));
            }
            for a in &actions {
                if !action_risk.contains_key(a) {
                    return Err(RiskError(format!("[grants] {role} grants {a:?}, which no level lists")));
                }
            }
            grants.insert(role, actions.into_iter().collect());
        }
        let wh = &file.work_hours;
        // "24:00" ends the day: 00:00–24:00 is round the clock.
        let end = if wh.end == "24:00" { Some(24 * 60) } else { minutes(&wh.end) };
        let (Some(work_start), Some(work_end)) = (minutes(&wh.start), end) else {
            return Err(RiskError("[work_hours] start and end must be \"HH:MM\" (end may be \"24:00\")".into()));
        };
        if wh.utc_offset_minutes.abs() > 14 * 60 {
            return Err(RiskError("[work_hours] utc_offset_minutes must be within ±840".into()));
        }
        Ok(Self { levels, action_risk, grants, work_start, work_end, utc_offset_minutes: wh.utc_offset_minutes })
    }

    /// The level of `action`, if any lists it.
    pub fn risk_of(&self, action: &str) -> Option<Risk> {
        self.action_risk.get(action).copied()
    }

    /// The rule of `risk`.
    pub fn level(&self, risk: Risk) -> &Level {
        // `parse` refuses a matrix without all four levels.
        &self.levels[&risk]
    }

    /// The actions (with their levels) a lease for `role` grants.
    pub fn grants(&self, role: Role) -> Vec<(String, Risk)> {
        self.grants
            .get(&role)
            .map(|s| s.iter().filter_map(|a| Some((a.clone(), self.risk_of(a)?))).collect())
            .unwrap_or_default()
    }

    /// Whether `at` falls inside the work hours (which may wrap past midnight).
    pub fn in_work_hours(&self, at: DateTime<Utc>) -> bool {
        let local = at + chrono::Duration::minutes(i64::from(self.utc_offset_minutes));
        let m = local.hour() * 60 + local.minute();
        if self.work_start <= self.work_end {
            (self.work_start..self.work_end).contains(&m)
        } else {
            m >= self.work_start || m < self.work_end
        }
    }

    /// The policy's answer for an action of `risk` at `at`, for a task that does or does
    /// not hold an approval.
    pub fn decide(&self, action: &str, risk: Risk, approved: bool, at: DateTime<Utc>) -> Decision {
        let level = self.level(risk);
        match level.auto_approve {
            AutoApprove::Always => Decision::Allow,
            AutoApprove::WorkHours if self.in_work_hours(at) || approved => Decision::Allow,
            AutoApprove::WorkHours => Decision::Deny {
                code: "outside_work_hours",
                message: format!("{action} is {risk:?} risk: it runs without approval only inside the work hours"),
            },
            AutoApprove::Never if approved => Decision::Allow,
            AutoApprove::Never => Decision::Deny {
                code: "needs_approval",
                message: format!(
                    "{action} is {risk:?} risk: it needs {} of the task first",
                    level.requires.as_deref().unwrap_or("an approval").replace('_', " ")
                ),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn shipped() -> RiskMatrix {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/risk_matrix.toml");
        RiskMatrix::load(&path).expect("the shipped matrix loads")
    }

    fn at(h: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-22T{h:02}:30:00Z")).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn the_shipped_matrix_follows_the_seed() {
        let m = shipped();
        assert_eq!(m.risk_of("llm.complete"), Some(Risk::Low));
        assert_eq!(m.risk_of("pkg_install"), Some(Risk::Medium));
        assert_eq!(m.risk_of("deploy_production"), Some(Risk::Critical));
        assert_eq!(m.risk_of("rm -rf"), None);
        assert_eq!(m.level(Risk::Low).token_limit, 200_000);
        assert_eq!(m.level(Risk::Medium).cost_limit_micro_usd, 2_000_000);
        let dev: Vec<String> = m.grants(Role::Dev).into_iter().map(|(a, _)| a).collect();
        assert_eq!(dev, ["linter", "llm.complete", "pkg_install", "read_files", "run_tests", "write_to_task_branch"]);
        let review: Vec<String> = m.grants(Role::Review).into_iter().map(|(a, _)| a).collect();
        assert_eq!(review, ["llm.complete", "read_files"]);
    }

    #[test]
    fn each_level_has_its_rule() {
        let m = shipped();
        assert_eq!(m.decide("llm.complete", Risk::Low, false, at(3)), Decision::Allow);
        assert_eq!(m.decide("pkg_install", Risk::Medium, false, at(12)), Decision::Allow);
        assert!(matches!(
            m.decide("pkg_install", Risk::Medium, false, at(23)),
            Decision::Deny { code: "outside_work_hours", .. }
        ));
        assert!(matches!(
            m.decide("modify_ci", Risk::High, false, at(12)),
            Decision::Deny { code: "needs_approval", .. }
        ));
        assert_eq!(m.decide("modify_ci", Risk::High, true, at(12)), Decision::Allow);
        assert!(matches!(
            m.decide("delete_data", Risk::Critical, false, at(12)),
            Decision::Deny { code: "needs_approval", .. }
        ));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let base = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/risk_matrix.toml"))
            .expect("read");
        let dup = base.replace("actions = [\"pkg_install\"", "actions = [\"llm.complete\", \"pkg_install\"");
        assert!(RiskMatrix::parse(&dup).unwrap_err().to_string().contains("two levels"));
        let lax = base.replacen("auto_approve = \"never\"", "auto_approve = \"always\"", 1);
        assert!(RiskMatrix::parse(&lax).unwrap_err().to_string().contains("never"));
        let grant = base.replace("dev = [\"llm.complete\",", "dev = [\"format_disk\",");
        assert_ne!(grant, base, "the test must edit dev's grants");
        assert!(RiskMatrix::parse(&grant).unwrap_err().to_string().contains("no level lists"));
        let hours = base.replace("start = \"08:00\"", "start = \"8am\"");
        assert!(RiskMatrix::parse(&hours).unwrap_err().to_string().contains("HH:MM"));
    }

    #[test]
    fn work_hours_may_last_the_whole_day() {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/risk_matrix.toml"))
            .unwrap()
            .replacen("end = \"22:00\"", "end = \"24:00\"", 1)
            .replacen("start = \"08:00\"", "start = \"00:00\"", 1);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let m = RiskMatrix::load(file.path()).unwrap();
        for h in [0, 7, 12, 23] {
            assert!(m.in_work_hours(at(h)), "{h}:00");
        }
    }

    #[test]
    fn work_hours_may_wrap_midnight() {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/risk_matrix.toml"))
            .expect("read")
            .replace("start = \"08:00\"", "start = \"22:00\"")
            .replace("end = \"22:00\"", "end = \"06:00\"");
        let m = RiskMatrix::parse(&text).expect("parse");
        assert!(m.in_work_hours(at(23)));
        assert!(m.in_work_hours(at(2)));
        assert!(!m.in_work_hours(at(12)));
    }
}
