//! JSON in and out: request bodies taken only from JSON objects, within the body limit, and
//! errors answered as `{"error": {"status", "message"}}`.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use helix_messaging_core::ErrorKind;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;

use crate::api::ErrorBody;

/// A `T` taken only from a JSON object: serde's derive also builds a struct from an array
/// of its fields' values, which no client means and the OpenAPI document does not allow.
struct ObjectOnly<T>(T);

impl<'de, T: DeserializeOwned> serde::Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        object(deserializer).map(ObjectOnly)
    }
}

/// `deserialize_with` for a nested body struct (see [`ObjectOnly`]).
pub(crate) fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::de::Error as _;
    let value = serde_json::Value::deserialize(deserializer)?;
    if !value.is_object() {
        return Err(D::Error::custom(format!(
            "expected a JSON object, found {value}"
        )));
    }
    T::deserialize(value).map_err(D::Error::custom)
}

/// `deserialize_with` for an optional nested body struct: `null` is `None`.
pub(crate) fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::de::Error as _;
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Null => Ok(None),
        value @ serde_json::Value::Object(_) => {
            T::deserialize(value).map(Some).map_err(D::Error::custom)
        }
        other => Err(D::Error::custom(format!(
            "expected a JSON object or null, found {other}"
        ))),
    }
}

/// A JSON request body whose rejections (malformed JSON 400, too large 413, wrong content
/// type 415) answer with the API's JSON errors. Optional: no body, no value.
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, ApiError> {
        match <Json<ObjectOnly<T>> as OptionalFromRequest<S>>::from_request(request, state).await {
            Ok(body) => Ok(body.map(|Json(ObjectOnly(value))| JsonBody(value))),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match <Json<ObjectOnly<T>> as FromRequest<S>>::from_request(request, state).await {
            Ok(Json(ObjectOnly(value))) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

/// A path parameter, refused as the JSON error every bad request gets (axum's own rejection,
/// for an id that is not UTF-8, say, is plain text).
pub(crate) struct PathParam<T>(pub(crate) T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParam(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

/// What an answer tells the audit trail beyond its status: the id of the job it started,
/// or the error's message. Carried in the answer's extensions, so the audit layer never
/// reads an answer's body back.
#[derive(Debug, Clone)]
pub(crate) struct AuditDetail(pub(crate) String);

/// An error answer: its status and a JSON body saying why.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl ApiError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<helix_messaging_core::Error> for ApiError {
    fn from(err: helix_messaging_core::Error) -> Self {
        let status = match err.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::InvalidInput | ErrorKind::Config | ErrorKind::Serialization => {
                StatusCode::BAD_REQUEST
            }
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            // A limit on jobs running at once: the client may try again later.
            ErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Closed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = AuditDetail(self.message.clone());
        let body = ErrorBody::new(Some(self.status.as_u16()), self.message);
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // Jobs end on their own; a second is as good a guess as any and keeps clients
            // from hammering.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(detail);
        response
    }
}
