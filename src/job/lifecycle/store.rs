//! The steps that move files between a job's container and the store:
//! save_cache, restore_cache, persist_to_workspace, attach_workspace,
//! store_artifacts, store_test_results. (Being built: issue 15.)

use std::time::Duration;

use super::End;
use super::steps::Steps;
use crate::model::{FailureKind, JobState, Step, StepResult};
use crate::runtime::JobContainer;

impl Steps<'_> {
    /// Runs one of the store's steps: its result, and how it ended the job
    /// if it did.
    pub(super) async fn run_store_step(
        &self,
        _container: &mut dyn JobContainer,
        index: u32,
        step: &Step,
    ) -> (StepResult, Option<End>) {
        let mut result = self.result(index, step);
        result.state = JobState::Failed;
        result.duration = Duration::ZERO;
        let message = format!(
            "step {:?}: {} steps are not available yet",
            step.name,
            step.kind.name()
        );
        self.job.system_line(index, &format!("runnel: {message}"));
        (result, Some(End::failed(FailureKind::Storage, message)))
    }
}
