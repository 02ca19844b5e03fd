//! Error codes carried by the `Error` frame.
//!
//! An error frame answers one request (its `reference` is the request's
//! client id or request id) and leaves the session open. Each code is listed
//! in `docs/protocol.md`.

/// Numeric code of an `Error` frame. Numbers follow HTTP's families so a
/// reader can guess the class: 4xx the request was wrong, 5xx retry later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame decoded but a field is invalid (bad conversation id, empty
    /// member list, a sequence of zero...).
    BadRequest = 400,
    /// The sender is not a member of the conversation, or is not allowed to
    /// change its membership.
    NotMember = 403,
    /// The conversation does not exist.
    UnknownConversation = 404,
    /// A per-device send named devices that are not the recipients'
    /// current ones (listed by the `DeviceMismatch` frame before it); fix
    /// the sessions and retry with the same client id.
    DeviceMismatch = 409,
    /// The message body is over the node's body size limit.
    BodyTooLarge = 413,
    /// A group would exceed its member cap.
    GroupFull = 422,
    /// The sender is over its send rate; retry the same client id later.
    RateLimited = 429,
    /// The store could not make the message durable (for example a full
    /// disk). The message was not accepted; retry with the same client id.
    StoreUnavailable = 503,
    /// The node is overloaded or shutting down; retry with the same client id.
    Unavailable = 504,
}

impl ErrorCode {
    /// Decodes a code read from the wire.
    pub fn from_u16(code: u16) -> Option<Self> {
        Some(match code {
            400 => Self::BadRequest,
            403 => Self::NotMember,
            404 => Self::UnknownConversation,
            409 => Self::DeviceMismatch,
            413 => Self::BodyTooLarge,
            422 => Self::GroupFull,
            429 => Self::RateLimited,
            503 => Self::StoreUnavailable,
            504 => Self::Unavailable,
            _ => return None,
        })
    }

    /// The code's short name, as used in docs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::NotMember => "not_member",
            Self::UnknownConversation => "unknown_conversation",
            Self::DeviceMismatch => "device_mismatch",
            Self::BodyTooLarge => "body_too_large",
            Self::GroupFull => "group_full",
            Self::RateLimited => "rate_limited",
            Self::StoreUnavailable => "store_unavailable",
            Self::Unavailable => "unavailable",
        }
    }
}
