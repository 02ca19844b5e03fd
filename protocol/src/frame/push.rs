//! The push-token frames: a device tells the server how to wake it when it
//! has no open session.
//!
//! Client frames only ([`ClientFrame::PushRegister`] `0x1a` and
//! [`ClientFrame::PushUnregister`] `0x1b`), answered with the ordinary
//! `Done` or `Error`. The token is the provider's opaque address of the
//! app on the device (an FCM registration token, an APNs device token in
//! hex, or whatever a webhook receiver uses); the server never parses it.

/// Frame type bytes of this family.
pub(super) mod ty {
    pub const PUSH_REGISTER: u8 = 0x1a;
    pub const PUSH_UNREGISTER: u8 = 0x1b;
}

/// Longest token accepted, in bytes. FCM registration tokens are about 160
/// bytes and APNs device tokens 64 hex digits; 4 KiB leaves room for a
/// webhook receiver's own address format.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Which service carries a device's notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PushProvider {
    /// A JSON POST to the operator's own HTTPS endpoint, signed with HMAC.
    Webhook = 1,
    /// Firebase Cloud Messaging, HTTP v1 API.
    Fcm = 2,
    /// Apple Push Notification service, HTTP/2 provider API.
    Apns = 3,
}

impl PushProvider {
    /// Every provider, in wire order.
    pub const ALL: [PushProvider; 3] = [Self::Webhook, Self::Fcm, Self::Apns];

    /// The provider a wire byte names, if any.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Webhook),
            2 => Some(Self::Fcm),
            3 => Some(Self::Apns),
            _ => None,
        }
    }

    /// Its name in metrics labels, logs and configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Fcm => "fcm",
            Self::Apns => "apns",
        }
    }
}
