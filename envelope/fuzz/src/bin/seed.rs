//! Writes the seed corpus of the `decode_verify` target: each seed envelope sealed as a
//! frame (what the target's `check` path wants) and as a bare body (what its decode-and-seal
//! path wants).
//!
//! Usage: `cargo run --bin seed [DIR]` (default `corpus/decode_verify`).

#![forbid(unsafe_code)]

use std::path::PathBuf;

use envelope_fuzz::{Fixture, STREAM, ctx, seed_envelopes};

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus/decode_verify".into()));
    std::fs::create_dir_all(&dir)?;
    let fixture = Fixture::new();
    let mut written = 0;
    for (name, env) in seed_envelopes() {
        let wire = fixture.operator.seal(&env).expect("the operator keyring has every edge");
        // Say which seeds pass every check, so a corpus that no longer reaches the
        // target's "accepted" branch is noticed.
        match fixture.verifier.check(STREAM, &wire, ctx()) {
            Ok(_) => println!("frame_{name}: accepted on {STREAM}."),
            Err(e) => println!("frame_{name}: refused ({}) on {STREAM}.", e.reason()),
        }
        std::fs::write(dir.join(format!("frame_{name}")), &wire)?;
        std::fs::write(dir.join(format!("body_{name}")), env.to_body_bytes())?;
        written += 2;
    }
    println!("Wrote {written} seed files to {}.", dir.display());
    Ok(())
}
