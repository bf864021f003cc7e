//! QEMU's job statuses, the transitions between them, and which verb a
//! job accepts in which status — two tables, checked on every change.

use std::fmt;

/// Where a job is in its life (QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// May the job move from `self` to `to`? (QEMU's transition table.)
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Undefined => to == Created,
            Created => matches!(to, Running | Aborting | Null),
            Running => matches!(to, Paused | Ready | Waiting | Aborting),
            Paused => to == Running,
            Ready => matches!(to, Standby | Waiting | Aborting),
            Standby => to == Ready,
            Waiting => matches!(to, Pending | Aborting),
            Pending => matches!(to, Aborting | Concluded),
            Aborting => matches!(to, Aborting | Concluded),
            Concluded => to == Null,
            Null => false,
        }
    }

    /// The status a pause turns this one into, if it pauses.
    pub fn paused_form(self) -> Option<JobStatus> {
        match self {
            JobStatus::Running => Some(JobStatus::Paused),
            JobStatus::Ready => Some(JobStatus::Standby),
            _ => None,
        }
    }

    /// The status a resume turns this one back into, if it is paused.
    pub fn resumed_form(self) -> Option<JobStatus> {
        match self {
            JobStatus::Paused => Some(JobStatus::Running),
            JobStatus::Standby => Some(JobStatus::Ready),
            _ => None,
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A command a job can be given (QEMU's `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Change,
    Complete,
    Finalize,
    Dismiss,
}

impl Verb {
    pub const ALL: [Verb; 8] = [
        Verb::Cancel,
        Verb::Pause,
        Verb::Resume,
        Verb::SetSpeed,
        Verb::Change,
        Verb::Complete,
        Verb::Finalize,
        Verb::Dismiss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Change => "change",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
    }

    /// Does a job in `status` accept this verb? (QEMU's verb table.)
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Verb::Cancel => matches!(status, Created | Running | Paused | Ready | Standby | Waiting | Pending),
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            Verb::Complete => matches!(status, Ready | Standby),
            Verb::Finalize => status == Pending,
            Verb::Dismiss => status == Concluded,
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    /// QEMU's transition table, row by row: (from, every allowed next status).
    const TRANSITIONS: &[(JobStatus, &[JobStatus])] = &[
        (Undefined, &[Created]),
        (Created, &[Running, Aborting, Null]),
        (Running, &[Paused, Ready, Waiting, Aborting]),
        (Paused, &[Running]),
        (Ready, &[Standby, Waiting, Aborting]),
        (Standby, &[Ready]),
        (Waiting, &[Pending, Aborting]),
        (Pending, &[Aborting, Concluded]),
        (Aborting, &[Aborting, Concluded]),
        (Concluded, &[Null]),
        (Null, &[]),
    ];

    /// QEMU's verb table: (verb, the statuses that accept it).
    const VERBS: &[(Verb, &[JobStatus])] = &[
        (Verb::Cancel, &[Created, Running, Paused, Ready, Standby, Waiting, Pending]),
        (Verb::Pause, &[Created, Running, Paused, Ready, Standby]),
        (Verb::Resume, &[Created, Running, Paused, Ready, Standby]),
        (Verb::SetSpeed, &[Created, Running, Paused, Ready, Standby]),
        (Verb::Change, &[Created, Running, Paused, Ready, Standby]),
        (Verb::Complete, &[Ready, Standby]),
        (Verb::Finalize, &[Pending]),
        (Verb::Dismiss, &[Concluded]),
    ];

    #[test]
    fn every_transition_pair_matches_the_table() {
        for &(from, allowed) in TRANSITIONS {
            for to in JobStatus::ALL {
                assert_eq!(from.can_become(to), allowed.contains(&to), "{from} -> {to}");
            }
        }
        assert_eq!(TRANSITIONS.len(), JobStatus::ALL.len());
    }

    #[test]
    fn every_verb_status_pair_matches_the_table() {
        for &(verb, allowed) in VERBS {
            for status in JobStatus::ALL {
                assert_eq!(verb.allowed_in(status), allowed.contains(&status), "{verb} in {status}");
            }
        }
        assert_eq!(VERBS.len(), Verb::ALL.len());
    }

    #[test]
    fn pause_and_resume_forms_are_inverse_transitions() {
        for s in JobStatus::ALL {
            if let Some(p) = s.paused_form() {
                assert!(s.can_become(p));
                assert_eq!(p.resumed_form(), Some(s));
                assert!(p.can_become(s));
            }
        }
        assert_eq!(Running.paused_form(), Some(Paused));
        assert_eq!(Ready.paused_form(), Some(Standby));
        assert_eq!(Waiting.paused_form(), None);
    }

    #[test]
    fn names_are_qemus() {
        let names: Vec<_> = JobStatus::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null"
            ]
        );
        assert_eq!(Verb::SetSpeed.name(), "set-speed");
    }
}
