//! Handlers that take a decoded value instead of bytes.

use std::future::Future;
use std::marker::PhantomData;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::delivery::Envelope;
use crate::runner::{Handler, HandlerError};

/// A [`Handler`] that decodes each payload as JSON into `T` first; build it with
/// [`json_handler`].
pub struct JsonHandler<T, F> {
    f: F,
    _value: PhantomData<fn() -> T>,
}

/// Turn `Fn(T, Envelope) -> impl Future<Output = Result<(), HandlerError>>` into a handler
/// of JSON payloads. A payload that does not decode into `T` never reaches `f`: it fails with
/// [`HandlerError::undecodable`], which a [`DeadLetterLayer`](crate::dlq::DeadLetterLayer)
/// dead-letters on its first delivery.
///
/// ```
/// use helix_messaging_core::{json_handler, Envelope};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// let handler = json_handler(|order: Order, _envelope: Envelope| async move {
///     println!("order {}", order.id);
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn json_handler<T, F, Fut>(f: F) -> JsonHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    JsonHandler {
        f,
        _value: PhantomData,
    }
}

#[async_trait]
impl<T, F, Fut> Handler for JsonHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, envelope: Envelope) -> Result<(), HandlerError> {
        let value: T = serde_json::from_slice(envelope.message.payload()).map_err(|err| {
            HandlerError::undecodable(format!(
                "payload is not a JSON {}: {err}",
                std::any::type_name::<T>()
            ))
        })?;
        (self.f)(value, envelope).await
    }
}
