//! WebSocket close codes the gateway sends, with their meaning.
//!
//! The 1xxx codes are RFC 6455's. The 4xxx codes are Courier's own; each is
//! listed in `docs/protocol.md` with what a client should do on receiving it.

/// Normal closure: the peer asked to close, or the session ended cleanly.
pub const NORMAL: u16 = 1000;
/// The gateway is shutting down; reconnect with backoff and catch up.
pub const GOING_AWAY: u16 = 1001;
/// A WebSocket framing rule was broken (RFC 6455 section 7.4.1).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A data type the gateway does not accept (text frames: protocol v1 is binary).
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A text frame that is not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A policy was violated. Reserved: v1 answers a send flood with `Error`
/// 429 and does not close.
pub const POLICY_VIOLATION: u16 = 1008;
/// A frame or message over the size limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The gateway hit an internal error. Reserved: v1 does not send it.
pub const INTERNAL_ERROR: u16 = 1011;

/// The session's token expired and was not refreshed in time.
pub const TOKEN_EXPIRED: u16 = 4001;
/// A newer session of the same device replaced this one.
pub const REPLACED: u16 = 4002;
/// The client did not read fast enough and its outbound queue stayed full.
/// Nothing is lost: undelivered messages come back through catch-up.
pub const SLOW_CONSUMER: u16 = 4003;
/// Nothing was received within the idle timeout.
pub const IDLE_TIMEOUT: u16 = 4004;
/// The session's device was unlinked by another device of the user; its
/// tokens issued before that are refused from now on.
pub const DEVICE_REMOVED: u16 = 4005;
/// The user already has as many linked devices as the node allows; unlink
/// one first.
pub const DEVICE_LIMIT: u16 = 4006;
/// An operator closed the session through the admin endpoint
/// (`POST /admin/disconnect`). The device may reconnect (with backoff) and
/// catch up; nothing is lost.
pub const OPERATOR_DISCONNECT: u16 = 4007;
/// A client protocol frame could not be decoded.
pub const MALFORMED_FRAME: u16 = 4400;

/// True for codes a peer may put on the wire in a close frame
/// (RFC 6455 section 7.4: 1005, 1006 and 1015 are reserved for local use,
/// 1004 is reserved, and codes below 1000 or in 1016..=2999 are unassigned).
pub fn is_sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_codes_are_not_sendable() {
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_sendable(code), "{code}");
        }
        for code in [
            NORMAL,
            GOING_AWAY,
            SLOW_CONSUMER,
            OPERATOR_DISCONNECT,
            MALFORMED_FRAME,
            3000,
            4999,
        ] {
            assert!(is_sendable(code), "{code}");
        }
    }
}
