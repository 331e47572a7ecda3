//! Feeds arbitrary bytes to the orchestrator's verifier (as an entry of `fleet:results`) and
//! to the body decoder. Neither may panic, and whatever they accept must be consistent:
//!
//! - `check` accepts ⇒ the frame decodes, its body decodes to the checked envelope and
//!   re-encodes to the same bytes, and sealing that envelope again gives the same wire bytes;
//! - `from_body_bytes` accepts ⇒ the envelope round-trips through `to_body_bytes`, and when
//!   its edge has a key, sealing it and checking the result either accepts exactly that
//!   envelope or refuses it for a reason that comes after the signature. This is how
//!   the fuzzer reaches the edge, permission, clock and epoch checks: it can't forge a MAC.

#![no_main]

use std::sync::OnceLock;

use envelope::wire::decode_frame;
use envelope::{Envelope, Role, VerifyError};
use envelope_fuzz::{Fixture, STREAM, ctx};
use libfuzzer_sys::fuzz_target;

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::new)
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();

    if let Ok(checked) = fx.verifier.check(STREAM, data, ctx()) {
        let frame = decode_frame(data).expect("a checked frame decodes");
        let env = checked.envelope();
        assert_eq!(&Envelope::from_body_bytes(frame.body).expect("a checked body decodes"), env);
        assert_eq!(env.to_body_bytes(), frame.body, "checked body is not canonical");
        assert_eq!(
            fx.operator.seal(env).expect("the edge has a key"),
            data,
            "re-sealing a checked envelope gives other wire bytes"
        );
    }

    if let Ok(env) = Envelope::from_body_bytes(data) {
        let body = env.to_body_bytes();
        assert_eq!(Envelope::from_body_bytes(&body).expect("an encoded body decodes"), env, "body round trip");
        if let Ok(wire) = fx.operator.seal(&env) {
            match fx.verifier.check(STREAM, &wire, ctx()) {
                Ok(checked) => assert_eq!(checked.envelope(), &env),
                Err(
                    VerifyError::TooLarge { .. }
                    | VerifyError::ForbiddenType { .. }
                    | VerifyError::TtlTooLong { .. }
                    | VerifyError::FutureDated { .. }
                    | VerifyError::Expired { .. }
                    | VerifyError::StaleEpoch { .. },
                ) => {}
                // The orchestrator has no key for edges it is not on.
                Err(VerifyError::UnknownKid(_)) if !orchestrator_is_on_edge(&env) => {}
                Err(e) => panic!("a freshly sealed envelope was refused: {e}"),
            }
        }
    }
});

fn orchestrator_is_on_edge(env: &Envelope) -> bool {
    env.to == Role::Orchestrator || env.from.role == Role::Orchestrator
}
