//! Who may change gating policies: a bearer token compared in constant time, never logged.

use subtle::ConstantTimeEq;

/// The admin bearer token. `Debug` redacts it.
#[derive(Clone)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// A token from its text (surrounding whitespace, e.g. a file's newline, is dropped);
    /// `None` when empty.
    pub fn new(text: &str) -> Option<Self> {
        let t = text.trim();
        (!t.is_empty()).then(|| AdminToken(t.to_string()))
    }

    /// Checks an `Authorization` header value (`Bearer <token>`).
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Denied> {
        let presented = authorization.ok_or(Denied::MissingToken)?;
        let token = presented
            .strip_prefix("Bearer ")
            .or_else(|| presented.strip_prefix("bearer "))
            .ok_or(Denied::MissingToken)?;
        if bool::from(token.trim().as_bytes().ct_eq(self.0.as_bytes())) {
            Ok(())
        } else {
            Err(Denied::BadToken)
        }
    }
}

/// Why a control call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer …` (401 / UNAUTHENTICATED).
    MissingToken,
    /// A token that does not match (403 / PERMISSION_DENIED).
    BadToken,
    /// No token is configured, so the control API is served only on the loopback admin
    /// listener (403 / PERMISSION_DENIED elsewhere).
    LoopbackOnly,
}

impl Denied {
    /// The `reason` label of `sluice_admin_rejections_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Denied::MissingToken => "missing_token",
            Denied::BadToken => "bad_token",
            Denied::LoopbackOnly => "loopback_only",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Denied::MissingToken => "the control API needs `Authorization: Bearer <token>`",
            Denied::BadToken => "the bearer token is not valid",
            Denied::LoopbackOnly => {
                "no admin token is configured: the control API is served only on the loopback admin listener (--admin-port)"
            }
        }
    }
}

/// How the control API is guarded on a listener.
#[derive(Clone, Debug)]
pub enum AdminAccess {
    /// The loopback admin listener: no token needed.
    Open,
    /// Calls need this bearer token.
    Token(AdminToken),
    /// Not served here (no token configured and this is not the admin listener).
    LoopbackOnly,
}

impl AdminAccess {
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Denied> {
        match self {
            AdminAccess::Open => Ok(()),
            AdminAccess::Token(t) => t.check(authorization),
            AdminAccess::LoopbackOnly => Err(Denied::LoopbackOnly),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_printed() {
        let t = AdminToken::new("s3cret\n").unwrap();
        assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
        assert_eq!(t.check(Some("Bearer s3cret")), Ok(()));
        assert_eq!(t.check(Some("Bearer s3cre")), Err(Denied::BadToken));
        assert_eq!(t.check(Some("s3cret")), Err(Denied::MissingToken));
        assert_eq!(t.check(None), Err(Denied::MissingToken));
        assert!(AdminToken::new("  ").is_none());
        assert_eq!(AdminAccess::LoopbackOnly.check(Some("Bearer s3cret")), Err(Denied::LoopbackOnly));
    }
}
