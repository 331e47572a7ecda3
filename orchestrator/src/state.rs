//! Task states and the XP cycle's legal transitions. Pure: persistence lives in [`crate::tasks`].
//!
//! ```text
//! submitted → dev → qa → review → approved → merged
//!                   ↑ ↓        ↓       ↑
//!                   dev      refactor → qa     (QA failure goes back to Dev with findings)
//! side states: failed, blocked (budget/policy), awaiting_approval (HIGH/CRITICAL), halted (kill switch)
//! operators: any open state → cancelled (final); failed or blocked → its step again (retry)
//! ```

use std::fmt;
use std::str::FromStr;

use envelope::Role;
use serde::{Deserialize, Serialize};

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted, not yet assigned.
    Submitted,
    /// A Dev worker is changing the code.
    Dev,
    /// A QA worker is testing it.
    Qa,
    /// A Review worker is gatekeeping it.
    Review,
    /// A Refactor worker is tidying it (then QA again).
    Refactor,
    /// Passed review; ready to merge.
    Approved,
    /// Done.
    Merged,
    /// Gave up (retries exhausted, rejected, unknown error).
    Failed,
    /// Stopped by budget or policy; resumes its step when unblocked.
    Blocked,
    /// HIGH/CRITICAL risk: waits for a human's approval before `approved`.
    AwaitingApproval,
    /// Stopped by the kill switch; resumes its step on resume.
    Halted,
    /// Cancelled by an operator: final, nothing of it is pushed.
    Cancelled,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 12] = [
        TaskState::Submitted,
        TaskState::Dev,
        TaskState::Qa,
        TaskState::Review,
        TaskState::Refactor,
        TaskState::Approved,
        TaskState::Merged,
        TaskState::Failed,
        TaskState::Blocked,
        TaskState::AwaitingApproval,
        TaskState::Halted,
        TaskState::Cancelled,
    ];

    /// The database and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Submitted => "submitted",
            TaskState::Dev => "dev",
            TaskState::Qa => "qa",
            TaskState::Review => "review",
            TaskState::Refactor => "refactor",
            TaskState::Approved => "approved",
            TaskState::Merged => "merged",
            TaskState::Failed => "failed",
            TaskState::Blocked => "blocked",
            TaskState::AwaitingApproval => "awaiting_approval",
            TaskState::Halted => "halted",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// The worker role that runs this step, for the four working states.
    pub fn worker(self) -> Option<Role> {
        match self {
            TaskState::Dev => Some(Role::Dev),
            TaskState::Qa => Some(Role::Qa),
            TaskState::Review => Some(Role::Review),
            TaskState::Refactor => Some(Role::Refactor),
            _ => None,
        }
    }

    /// Terminal states never change again, except that an operator may retry a failed task.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Merged | TaskState::Failed | TaskState::Cancelled)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown task state {0:?}; expected one of submitted, dev, qa, review, refactor, approved, merged, failed, blocked, awaiting_approval, halted, cancelled"
)]
pub struct UnknownState(pub String);

impl FromStr for TaskState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Risk of a task, from the risk matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Risk {
    /// Automatic.
    Low,
    /// Automatic in working hours.
    Medium,
    /// Needs approval.
    High,
    /// Needs a human.
    Critical,
}

impl Risk {
    /// Database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "LOW",
            Risk::Medium => "MEDIUM",
            Risk::High => "HIGH",
            Risk::Critical => "CRITICAL",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        [Risk::Low, Risk::Medium, Risk::High, Risk::Critical].into_iter().find(|r| r.as_str() == s)
    }
}

/// What happened to a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A submitted task starts with Dev.
    Start,
    /// An incident's fix task starts with Refactor.
    StartFix,
    /// The current step's worker reported success.
    StepSucceeded,
    /// Review asked for a refactor before approving.
    RefactorRequested,
    /// QA (or Review) found problems: back to Dev with the findings, if retries remain.
    SentBack,
    /// The step failed or its worker went silent: the same step again, if retries remain.
    Retry,
    /// A human approved a HIGH/CRITICAL task.
    Approved,
    /// A human rejected it.
    Rejected,
    /// The approved change was merged.
    Merged,
    /// Budget or policy stopped it.
    Block,
    /// Budget or policy allows it again.
    Unblock,
    /// The kill switch engaged.
    Halt,
    /// An operator resumed the fleet.
    Resume,
    /// Unrecoverable (unknown error kind, retries exhausted elsewhere).
    Fail,
    /// An operator cancelled the task.
    Cancel,
    /// An operator retries a failed or blocked task: back to the step in `resume`.
    Reopen,
}

/// What the transition needs to know beyond the current state.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// The task's risk.
    pub risk: Risk,
    /// Retries used so far.
    pub retries: u32,
    /// `retries.max_per_task`.
    pub max_retries: u32,
    /// The step a side state resumes.
    pub resume: Option<TaskState>,
}

/// A transition the cycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event:?} in state {from}")]
pub struct IllegalTransition {
    /// State the task was in.
    pub from: TaskState,
    /// What was attempted.
    pub event: Event,
}

/// The state after `event` in `from`, or why that can't happen.
pub fn next(from: TaskState, event: &Event, ctx: Context) -> Result<TaskState, IllegalTransition> {
    use TaskState::*;
    let illegal = || IllegalTransition { from, event: event.clone() };
    let retries_left = ctx.retries < ctx.max_retries;
    Ok(match (from, event) {
        (Submitted, Event::Start) => Dev,
        (Submitted, Event::StartFix) => Refactor,
        (Dev, Event::StepSucceeded) => Qa,
        (Qa, Event::StepSucceeded) => Review,
        (Refactor, Event::StepSucceeded) => Qa,
        (Review, Event::StepSucceeded) if ctx.risk >= Risk::High => AwaitingApproval,
        (Review, Event::StepSucceeded) => Approved,
        (Review, Event::RefactorRequested) => Refactor,
        (Qa | Review, Event::SentBack) if retries_left => Dev,
        (Qa | Review, Event::SentBack) => Failed,
        (Dev | Qa | Review | Refactor, Event::Retry) if retries_left => from,
        (Dev | Qa | Review | Refactor, Event::Retry) => Failed,
        (AwaitingApproval, Event::Approved) => Approved,
        (AwaitingApproval, Event::Rejected) => Failed,
        (Approved, Event::Merged) => Merged,
        (Dev | Qa | Review | Refactor | Approved, Event::Block) => Blocked,
        (Blocked, Event::Unblock) => ctx.resume.ok_or_else(illegal)?,
        (s, Event::Halt) if !s.is_terminal() && s != Halted => Halted,
        (Halted, Event::Resume) => ctx.resume.ok_or_else(illegal)?,
        (s, Event::Fail) if !s.is_terminal() => Failed,
        (s, Event::Cancel) if !s.is_terminal() => Cancelled,
        (Blocked, Event::Reopen) => ctx.resume.ok_or_else(illegal)?,
        (Failed, Event::Reopen) => match ctx.resume {
            Some(step @ (Dev | Qa | Review | Refactor)) => step,
            _ => return Err(illegal()),
        },
        _ => return Err(illegal()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(risk: Risk, retries: u32) -> Context {
        Context { risk, retries, max_retries: 3, resume: None }
    }

    #[test]
    fn the_happy_path_of_the_xp_cycle() {
        let c = ctx(Risk::Low, 0);
        let mut s = next(TaskState::Submitted, &Event::Start, c).unwrap();
        for want in [TaskState::Qa, TaskState::Review, TaskState::Approved] {
            s = next(s, &Event::StepSucceeded, c).unwrap();
            assert_eq!(s, want);
        }
        assert_eq!(next(s, &Event::Merged, c).unwrap(), TaskState::Merged);
        assert!(next(TaskState::Merged, &Event::Halt, c).is_err());
    }

    #[test]
    fn refactor_goes_back_through_qa_and_high_risk_waits_for_approval() {
        let c = ctx(Risk::High, 0);
        assert_eq!(next(TaskState::Review, &Event::RefactorRequested, c).unwrap(), TaskState::Refactor);
        assert_eq!(next(TaskState::Refactor, &Event::StepSucceeded, c).unwrap(), TaskState::Qa);
        assert_eq!(next(TaskState::Review, &Event::StepSucceeded, c).unwrap(), TaskState::AwaitingApproval);
        assert_eq!(next(TaskState::AwaitingApproval, &Event::Approved, c).unwrap(), TaskState::Approved);
        assert_eq!(next(TaskState::AwaitingApproval, &Event::Rejected, c).unwrap(), TaskState::Failed);
    }

    #[test]
    fn retries_are_bounded() {
        assert_eq!(next(TaskState::Qa, &Event::SentBack, ctx(Risk::Low, 2)).unwrap(), TaskState::Dev);
        assert_eq!(next(TaskState::Qa, &Event::SentBack, ctx(Risk::Low, 3)).unwrap(), TaskState::Failed);
        assert_eq!(next(TaskState::Dev, &Event::Retry, ctx(Risk::Low, 0)).unwrap(), TaskState::Dev);
        assert_eq!(next(TaskState::Dev, &Event::Retry, ctx(Risk::Low, 3)).unwrap(), TaskState::Failed);
    }

    #[test]
    fn side_states_resume_their_step_and_illegal_moves_are_typed() {
        let mut c = ctx(Risk::Low, 0);
        assert_eq!(next(TaskState::Qa, &Event::Halt, c).unwrap(), TaskState::Halted);
        assert!(next(TaskState::Halted, &Event::Resume, c).is_err(), "resume needs the step to resume");
        c.resume = Some(TaskState::Qa);
        assert_eq!(next(TaskState::Halted, &Event::Resume, c).unwrap(), TaskState::Qa);
        assert_eq!(next(TaskState::Blocked, &Event::Unblock, c).unwrap(), TaskState::Qa);
        let err = next(TaskState::Submitted, &Event::StepSucceeded, c).unwrap_err();
        assert_eq!(err, IllegalTransition { from: TaskState::Submitted, event: Event::StepSucceeded });
        assert!(next(TaskState::Dev, &Event::Approved, c).is_err());
        assert!(next(TaskState::Failed, &Event::Fail, c).is_err());
        assert_eq!(next(TaskState::Halted, &Event::Cancel, c).unwrap(), TaskState::Cancelled);
        assert!(next(TaskState::Merged, &Event::Cancel, c).is_err());
        assert!(next(TaskState::Cancelled, &Event::Halt, c).is_err());
        assert_eq!(next(TaskState::Failed, &Event::Reopen, c).unwrap(), TaskState::Qa);
        assert!(next(TaskState::Dev, &Event::Reopen, c).is_err());
        c.resume = Some(TaskState::Approved);
        assert_eq!(next(TaskState::Blocked, &Event::Reopen, c).unwrap(), TaskState::Approved);
        assert!(next(TaskState::Failed, &Event::Reopen, c).is_err(), "a failed task restarts a working step only");
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>(), Ok(s));
        }
    }
}
