//! Bearer-token roles. A scheduler token may call everything; an operator
//! token only the read-only calls. Tokens are compared in constant time.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::config::AuthConfig;
use crate::model::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Operator,
    Scheduler,
}

#[derive(Debug, Clone, Default)]
pub struct Tokens {
    scheduler: Vec<Secret>,
    operator: Vec<Secret>,
}

impl Tokens {
    pub fn new(config: &AuthConfig) -> Self {
        Tokens {
            scheduler: config.scheduler_tokens.clone(),
            operator: config.operator_tokens.clone(),
        }
    }

    /// The role of `token`. Every configured token is compared, so the time
    /// taken does not tell which (or whether one) matched.
    fn role_of(&self, token: &[u8]) -> Option<Role> {
        let mut scheduler = subtle::Choice::from(0);
        for t in &self.scheduler {
            scheduler |= t.expose().ct_eq(token);
        }
        let mut operator = subtle::Choice::from(0);
        for t in &self.operator {
            operator |= t.expose().ct_eq(token);
        }
        if bool::from(scheduler) {
            Some(Role::Scheduler)
        } else if bool::from(operator) {
            Some(Role::Operator)
        } else {
            None
        }
    }

    /// Refuses the call unless it carries a token of at least `need`.
    pub fn check<T>(&self, req: &Request<T>, need: Role) -> Result<Role, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("no `authorization: Bearer <token>` metadata"))?;
        let token = header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .ok_or_else(|| Status::unauthenticated("the authorization metadata is not `Bearer <token>`"))?;
        let role = self
            .role_of(token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if role < need {
            return Err(Status::permission_denied(
                "an operator token may only watch, get and list jobs and read agent info",
            ));
        }
        Ok(role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(&AuthConfig {
            scheduler_tokens: vec![Secret::from("sched".to_string())],
            operator_tokens: vec![Secret::from("oper".to_string())],
        })
    }

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        r
    }

    #[test]
    fn roles() {
        let t = tokens();
        assert_eq!(
            t.check(&req(Some("Bearer sched")), Role::Scheduler).unwrap(),
            Role::Scheduler
        );
        assert_eq!(
            t.check(&req(Some("Bearer oper")), Role::Operator).unwrap(),
            Role::Operator
        );
        assert_eq!(
            t.check(&req(Some("Bearer oper")), Role::Scheduler)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        for bad in [None, Some("Bearer nope"), Some("sched"), Some("Bearer ")] {
            assert_eq!(
                t.check(&req(bad), Role::Operator).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
    }
}
