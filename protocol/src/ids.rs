//! User and conversation identifiers.
//!
//! A user id is 1 to 64 bytes of `[A-Za-z0-9._@+-]`. A conversation id is
//! either direct, `d:<user>:<user>` with the two user ids in ascending byte
//! order, or a group, `g:` followed by 16 lowercase hex digits assigned by the
//! server when the group is created. A direct conversation exists as soon as
//! either participant sends to it; its members are the two users it names.

/// The longest user id accepted.
pub const MAX_USER_ID: usize = 64;

/// What a well-formed conversation id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConversationKind<'a> {
    /// A conversation between exactly these two users (in ascending order).
    Direct(&'a str, &'a str),
    /// A group with this server-assigned number.
    Group(u64),
}

/// True when `id` is a well-formed user id.
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USER_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-'))
}

/// Parses a conversation id; `None` when it is not well-formed.
pub fn parse_conversation(id: &str) -> Option<ConversationKind<'_>> {
    if let Some(rest) = id.strip_prefix("d:") {
        let (a, b) = rest.split_once(':')?;
        (is_valid_user_id(a) && is_valid_user_id(b) && a < b)
            .then_some(ConversationKind::Direct(a, b))
    } else if let Some(hex) = id.strip_prefix("g:") {
        let lower_hex =
            hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        lower_hex
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
            .map(ConversationKind::Group)
    } else {
        None
    }
}

/// The canonical id of the direct conversation between `a` and `b`.
pub fn direct_conversation(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("d:{lo}:{hi}")
}

/// The id of the group numbered `n`.
pub fn group_conversation(n: u64) -> String {
    format!("g:{n:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(is_valid_user_id("alice"));
        assert!(is_valid_user_id("+4915112345678"));
        assert!(!is_valid_user_id(""));
        assert!(!is_valid_user_id("a:b"));
        assert!(!is_valid_user_id("ünï"));
        assert!(!is_valid_user_id(&"x".repeat(65)));
    }

    #[test]
    fn conversations_round_trip() {
        let d = direct_conversation("bob", "alice");
        assert_eq!(d, "d:alice:bob");
        assert_eq!(
            parse_conversation(&d),
            Some(ConversationKind::Direct("alice", "bob"))
        );
        let g = group_conversation(0xdead_beef);
        assert_eq!(
            parse_conversation(&g),
            Some(ConversationKind::Group(0xdead_beef))
        );
    }

    #[test]
    fn malformed_conversations() {
        for bad in [
            "",
            "d:",
            "d:bob:alice",
            "d:a:a",
            "d:a",
            "g:123",
            "g:DEADBEEFDEADBEEF",
            "x:1",
            "d:a:b:c",
        ] {
            assert_eq!(parse_conversation(bad), None, "{bad}");
        }
    }
}
