//! A job's observable state: where it is in its lifecycle, why it failed,
//! and the results of its steps. Serialisable, as it is kept on disk.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Preparing,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Cancelled
                | JobState::TimedOut
                | JobState::Lost
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Preparing => "PREPARING",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
            JobState::Lost => "LOST",
        }
    }
}

/// Why a job failed, for schedulers to act on without parsing text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    #[default]
    None,
    BadSpec,
    HostKey,
    Auth,
    RepoNotFound,
    Revision,
    Checkout,
    Image,
    Step,
    Timeout,
    Cancelled,
    Agent,
    /// A service did not start, or did not accept connections in time.
    Service,
    /// A step printed nothing for its no-output timeout.
    NoOutput,
    /// An artifact, workspace or test-results step could not use the store.
    Storage,
}

impl FailureKind {
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::None => "",
            FailureKind::BadSpec => "BAD_SPEC",
            FailureKind::HostKey => "HOST_KEY",
            FailureKind::Auth => "AUTH",
            FailureKind::RepoNotFound => "REPO_NOT_FOUND",
            FailureKind::Revision => "REVISION",
            FailureKind::Checkout => "CHECKOUT",
            FailureKind::Image => "IMAGE",
            FailureKind::Step => "STEP",
            FailureKind::Timeout => "TIMEOUT",
            FailureKind::Cancelled => "CANCELLED",
            FailureKind::Agent => "AGENT",
            FailureKind::Service => "SERVICE",
            FailureKind::NoOutput => "NO_OUTPUT",
            FailureKind::Storage => "STORAGE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    pub index: u32,
    pub name: String,
    pub state: JobState,
    /// -1 when killed by a signal.
    pub exit_code: i32,
    pub signal: i32,
    pub duration: Duration,
    /// `None`: the step did not run (see `note`).
    #[serde(default)]
    pub started: Option<SystemTime>,
    #[serde(default)]
    pub when: super::spec::When,
    /// Why it did not run, or how a background step ended.
    #[serde(default)]
    pub note: String,
    #[serde(default)]
    pub background: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: String,
    pub state: JobState,
    pub failure: FailureKind,
    /// A sentence for a person: what went wrong and what to do about it.
    pub message: String,
    pub created: SystemTime,
    pub started: Option<SystemTime>,
    pub finished: Option<SystemTime>,
    /// The last event's seq.
    pub last_seq: u64,
    pub steps: Vec<StepResult>,
    /// What its store_test_results steps found, all of them together.
    #[serde(default)]
    pub test_results: Option<TestResults>,
    /// Which run of the job this is: 1, or the delivery a job taken from
    /// the fleet's queue came with.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

/// JUnit results: totals over every file read, and the tests that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResults {
    pub tests: u32,
    pub failures: u32,
    pub errors: u32,
    pub skipped: u32,
    /// The failed and errored tests, the first [`MAX_FAILED_TESTS`].
    pub failed: Vec<TestFailure>,
    /// Result files read.
    pub files: u32,
    /// Files that could not be read, each "PATH: why".
    pub unreadable: Vec<String>,
}

/// How many failed tests a status names; the totals count them all.
pub const MAX_FAILED_TESTS: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailure {
    pub suite: String,
    pub classname: String,
    pub name: String,
    /// The failure's message, else the first line of its text.
    pub message: String,
    /// The result file it came from.
    pub file: String,
}

impl TestResults {
    /// Adds `other`'s counts and failures to these.
    pub fn merge(&mut self, other: TestResults) {
        self.tests = self.tests.saturating_add(other.tests);
        self.failures = self.failures.saturating_add(other.failures);
        self.errors = self.errors.saturating_add(other.errors);
        self.skipped = self.skipped.saturating_add(other.skipped);
        self.files = self.files.saturating_add(other.files);
        let room = MAX_FAILED_TESTS.saturating_sub(self.failed.len());
        self.failed.extend(other.failed.into_iter().take(room));
        self.unreadable.extend(other.unreadable);
    }
}

impl JobStatus {
    pub fn new(job_id: String) -> Self {
        JobStatus {
            job_id,
            state: JobState::Queued,
            failure: FailureKind::None,
            message: String::new(),
            created: SystemTime::now(),
            started: None,
            finished: None,
            last_seq: 0,
            steps: Vec::new(),
            test_results: None,
            attempt: 1,
        }
    }
}
