//! A child process's output, read with a bound.
//!
//! Repository content decides how much git prints (a diff of a huge file, `git show` of a
//! crafted commit). Holding it whole lets a hostile repository exhaust a worker's or the
//! orchestrator's memory; this reads at most a cap of stdout, kills the child past it, and
//! drains stderr without keeping more than [`STDERR_KEEP`] of it, so the child never blocks
//! on a full pipe.
//!
//! # Layout
//! - [`capped_output`] and [`CappedOutput`]: run to the end, keep what fits.

#![forbid(unsafe_code)]

/// How much of a child's stderr is kept (for error messages); the rest is read and dropped.
pub const STDERR_KEEP: usize = 64 * 1024;

/// What a child wrote: stdout (`None` past the cap), the first [`STDERR_KEEP`] bytes of
/// stderr, and how it exited.
#[derive(Debug)]
pub struct CappedOutput {
    /// How the child exited (killed, when stdout went past the cap).
    pub status: std::process::ExitStatus,
    /// Everything it wrote to stdout, or `None` when that was more than the cap.
    pub stdout: Option<Vec<u8>>,
    /// The first [`STDERR_KEEP`] bytes of its stderr.
    pub stderr: Vec<u8>,
}

/// Reads the child's stdout and stderr to their end, keeping at most `cap` bytes of stdout:
/// past it the child is killed and stdout is reported as `None`. Stderr past
/// [`STDERR_KEEP`] is read and dropped, so the child never blocks on a full pipe.
pub async fn capped_output(child: &mut tokio::process::Child, cap: usize) -> std::io::Result<CappedOutput> {
    use tokio::io::AsyncReadExt;
    async fn keep(pipe: Option<impl tokio::io::AsyncRead + Unpin>, cap: usize) -> std::io::Result<(Vec<u8>, bool)> {
        let Some(mut pipe) = pipe else { return Ok((Vec::new(), false)) };
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = pipe.read(&mut buf).await?;
            if n == 0 {
                return Ok((kept, false));
            }
            // Keep what fits: how the pipe happens to chunk its reads must not decide how
            // much of the text is kept.
            let room = cap - kept.len();
            kept.extend_from_slice(&buf[..n.min(room)]);
            if n > room {
                return Ok((kept, true));
            }
        }
    }
    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (out, err) = tokio::join!(
        async {
            let read = keep(stdout, cap).await;
            if matches!(read, Ok((_, true))) {
                // Over the cap: stop git now, drop what it wrote.
                let _ = child.start_kill();
            }
            read
        },
        async {
            let (kept, over) = keep(stderr.as_mut(), STDERR_KEEP).await?;
            if over && let Some(pipe) = stderr.as_mut() {
                tokio::io::copy(pipe, &mut tokio::io::sink()).await?;
            }
            Ok::<_, std::io::Error>(kept)
        }
    );
    let (stdout, over) = out?;
    let stderr = err?;
    let status = child.wait().await?;
    Ok(CappedOutput { status, stdout: (!over).then_some(stdout), stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(script: &str, cap: usize) -> CappedOutput {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        capped_output(&mut child, cap).await.expect("read")
    }

    #[tokio::test]
    async fn output_within_the_cap_is_kept_whole() {
        let out = run("printf abc; printf err >&2", 3).await;
        assert!(out.status.success());
        assert_eq!((out.stdout.as_deref(), out.stderr.as_slice()), (Some(&b"abc"[..]), &b"err"[..]));
    }

    #[tokio::test]
    async fn past_the_cap_the_child_is_killed_and_nothing_is_kept() {
        // `yes` never ends by itself: only the kill stops it.
        let out = run("yes", 1024 * 1024).await;
        assert_eq!(out.stdout, None);
        assert!(!out.status.success());
    }

    #[tokio::test]
    async fn a_flood_of_stderr_is_drained_and_cut() {
        let out = run("head -c 1000000 /dev/zero >&2; printf done", 16).await;
        assert_eq!(out.stdout.as_deref(), Some(&b"done"[..]));
        assert_eq!(out.stderr.len(), STDERR_KEEP);
    }
}
