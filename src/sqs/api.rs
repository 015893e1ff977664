//! The SQS calls pgtide makes more than once, and how their errors become pgtide's.

use std::time::Duration;

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;

use crate::error::{Error, Result};

/// The backend's name in errors.
pub(super) const NAME: &str = "sqs";

/// A broker error with a message.
pub(super) fn broker(
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    retryable: bool,
) -> Error {
    Error::Broker {
        backend: NAME,
        source: e.into(),
        retryable,
    }
}

/// The SQS error code of a failed call, if the service answered.
pub(super) fn code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

/// Whether `code` says the queue does not exist (the JSON and the query protocol spellings).
pub(super) fn queue_missing(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
    )
}

/// Whether `code` says a receipt handle no longer names an in-flight message.
pub(super) fn handle_gone(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "ReceiptHandleIsInvalid"
                | "MessageNotInflight"
                | "AWS.SimpleQueueService.MessageNotInflight"
                | "InvalidParameterValue"
        )
    )
}

/// A failed call as a pgtide error: transport failures, timeouts and throttling are retryable,
/// the rest is not. The whole error chain goes into the message (the SDK's own display is
/// terse).
pub(super) fn sdk<E, R>(e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let retryable = match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => s.err().code().is_some_and(|c| {
            c.contains("Throttl")
                || c.contains("Unavailable")
                || c.contains("InternalError")
                || c == "RequestTimeout"
                || c == "PurgeQueueInProgress"
        }),
        _ => false,
    };
    broker(DisplayErrorContext(&e).to_string(), retryable)
}

/// Bounds a call by `timeout` (retryable error when it passes): the SDK's own operation
/// timeout would also cut long polls.
pub(super) async fn timed<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(broker(
            format!("no answer from SQS within {timeout:?}"),
            true,
        )),
    }
}

/// The URL of queue `name`, or `None` if it does not exist.
pub(super) async fn queue_url(client: &Client, name: &str) -> Result<Option<String>> {
    match client.get_queue_url().queue_name(name).send().await {
        Ok(out) => Ok(out.queue_url().map(str::to_owned)),
        Err(e) if queue_missing(code(&e)) => Ok(None),
        Err(e) => Err(sdk(e)),
    }
}

/// The ARN of the queue at `url`, or `None` if it does not exist.
pub(super) async fn queue_arn(client: &Client, url: &str) -> Result<Option<String>> {
    match client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
    {
        Ok(out) => Ok(out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()),
        Err(e) if queue_missing(code(&e)) => Ok(None),
        Err(e) => Err(sdk(e)),
    }
}

/// Deletes the queue at `url`; false if it did not exist.
pub(super) async fn delete_queue(client: &Client, url: &str) -> Result<bool> {
    match client.delete_queue().queue_url(url).send().await {
        Ok(_) => Ok(true),
        Err(e) if queue_missing(code(&e)) => Ok(false),
        Err(e) => Err(sdk(e)),
    }
}

/// Seconds for an SQS timeout field: rounded up (a lease or delay is never shorter than asked),
/// capped at `max`.
pub(super) fn seconds_up(d: Duration, max: u64) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.min(max) as i32
}
