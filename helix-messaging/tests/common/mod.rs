//! Helpers the DLQ tests share.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

/// The progress of redrive job `job` once it has finished (15 s at most).
pub async fn redrive_finished(
    processor: &helix_messaging::dlq::Processor,
    job: &str,
) -> helix_messaging::dlq::RedriveProgress {
    helix_messaging_testkit::eventually(Duration::from_secs(15), "the redrive job finished", || {
        let (processor, job) = (processor.clone(), job.to_owned());
        async move {
            processor
                .redrive_progress(&job)
                .ok()
                .filter(|p| p.status.is_finished())
        }
    })
    .await
}

/// Re-drive every entry `processor`'s store holds, as fast as the broker confirms; the job's
/// progress once it has finished.
pub async fn unpaced_redrive(
    processor: &helix_messaging::dlq::Processor,
) -> helix_messaging::dlq::RedriveProgress {
    let job = processor
        .start_redrive(helix_messaging::dlq::RedriveRequest {
            rate_per_second: None,
            ..helix_messaging::dlq::RedriveRequest::default()
        })
        .await
        .unwrap();
    redrive_finished(processor, &job.id).await
}
