//! `fleetctl tail STREAM`: follow a stream live and print one verified line per entry.
//!
//! Tail is read-only. It reads with plain `XREAD BLOCK` (never a consumer group, so it
//! claims, moves and acknowledges nothing), verifies with [`Verifier::check`] (every check
//! but replay, so it consumes no replay state), and needs only the operator's read-only
//! Redis user (`XREAD`, `XREVRANGE`).
//!
//! Without `--from-start` it begins after the stream's newest entry as of the start, by id
//! (not `$`, which would skip whatever arrives between two reads); every read continues
//! after the last entry printed, so a reconnect neither repeats nor skips an entry.
//!
//! [`run`] is the whole loop over a [`RedisEndpoint`] and two writers (lines, and notes
//! such as warnings), so tests drive it directly; `command.rs` wires it to the command
//! line, stdout/stderr and the signals.
//!
//! # Layout
//! - [`run`], [`TailOptions`], [`Ended`], [`TailError`]: the read → verify → print loop,
//!   with reconnection and backoff.
//! - `endpoint.rs`: [`RedisEndpoint`], the server as messages may name it (`host:port`).
//! - `render.rs`: one entry as a text line or a JSON object; payload summaries; making
//!   sender-controlled text safe for a terminal.
//! - `command.rs`: [`command`], `fleetctl tail` itself (files, runtime, SIGINT/SIGTERM).

mod command;
mod endpoint;
mod render;

use std::future::Future;
use std::io::{self, Write};
use std::time::Duration;

use bus::BusError;
use bus::reply::{self, Entry};
use envelope::{StreamName, Verifier};
use redis::aio::MultiplexedConnection;

pub use command::command;
pub use endpoint::RedisEndpoint;

use endpoint::retryable;
use render::Line;

/// Most entries asked for per `XREAD`.
const BATCH: u64 = 256;

/// What to follow and how to print it.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// The stream.
    pub stream: StreamName,
    /// Read from the stream's first entry instead of after its newest one.
    pub from_start: bool,
    /// Stop after this many entries; `None` runs until shut down.
    pub count: Option<u64>,
    /// One JSON object per line instead of text columns.
    pub json: bool,
    /// The operator's keys and the permission table: what makes an entry `ok`.
    pub verifier: Verifier,
    /// How long one `XREAD` blocks; reads also race the shutdown signal, so this only
    /// bounds how long a silent connection goes unchecked.
    pub block: Duration,
    /// Connection attempts at start before giving up.
    pub start_attempts: u32,
    /// First wait before reconnecting; doubles per failure.
    pub retry_first: Duration,
    /// Longest wait between reconnection attempts.
    pub retry_max: Duration,
}

impl TailOptions {
    /// Defaults for following `stream` with `verifier`: from the end, forever, as text.
    pub fn new(stream: StreamName, verifier: Verifier) -> Self {
        Self {
            stream,
            from_start: false,
            count: None,
            json: false,
            verifier,
            block: Duration::from_secs(5),
            start_attempts: 4,
            retry_first: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Why [`run`] returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `count` entries were printed.
    Count,
    /// The shutdown future completed (Ctrl-C).
    Shutdown,
    /// The reader of the output went away (`fleetctl tail … | head`).
    OutputClosed,
}

/// Why [`run`] failed. Messages name the server by `host:port` only.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// Redis could not be reached (or refused us) at start.
    #[error(
        "cannot read {stream} from Redis at {address} ({attempts} attempt(s)): {cause}. Check that Redis is running and \
         reachable at {address}, and that --redis (or FLEET_REDIS_URL) has the right host, port, user and password \
         (the read-only operator user of `fleetctl acl`)"
    )]
    Connect {
        /// `host:port`.
        address: String,
        /// The stream.
        stream: String,
        /// Attempts made.
        attempts: u32,
        /// The last error, redacted.
        cause: String,
    },
    /// Redis refused a read in a way retrying can't fix (permissions, a wrong key type).
    #[error(
        "Redis at {address} refused to let us read {stream}: {cause}. Check that the user in --redis may run XREAD on \
         fleet:* (the operator user of `fleetctl acl` may) and that {stream} is a stream"
    )]
    Refused {
        /// `host:port`.
        address: String,
        /// The stream.
        stream: String,
        /// The error, redacted.
        cause: String,
    },
    /// Redis answered something this code does not understand.
    #[error(transparent)]
    Reply(#[from] BusError),
    /// Writing the output failed (other than its reader going away).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// Follows `opts.stream` on `redis`, printing one line per entry to `out` and warnings and
/// progress notes to `notes`, until `count` entries were printed, `shutdown` completes or
/// `out` is closed.
///
/// At start, connecting and locating the stream's end are tried `start_attempts` times;
/// later, a lost connection is retried forever with backoff (a warning on `notes` each
/// time), continuing after the last entry printed. Every wait races `shutdown`.
pub async fn run(
    redis: &RedisEndpoint,
    opts: &TailOptions,
    out: &mut impl Write,
    notes: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, TailError> {
    tokio::pin!(shutdown);
    let stream = opts.stream.as_str();
    let address = redis.address();

    let mut delay = opts.retry_first;
    let mut attempts = 0;
    let (conn, mut last_id) = loop {
        attempts += 1;
        let started = tokio::select! {
            r = start(redis, opts) => r,
            () = &mut shutdown => return Ok(Ended::Shutdown),
        };
        let err = match started {
            Ok(started) => break started,
            Err(ReadError::Reply(e)) => return Err(e.into()),
            Err(ReadError::Redis(e)) => e,
        };
        let cause = redis.describe(&err);
        if attempts >= opts.start_attempts.max(1) || !retryable(&err) {
            return Err(TailError::Connect { address: address.to_owned(), stream: stream.to_owned(), attempts, cause });
        }
        note(notes, &format!("warning: cannot reach Redis at {address} ({cause}); retrying in {}", secs(delay)));
        if sleep_or_shutdown(delay, &mut shutdown).await {
            return Ok(Ended::Shutdown);
        }
        delay = (delay * 2).min(opts.retry_max);
    };
    let mut conn = Some(conn);
    if opts.from_start {
        note(notes, &format!("Reading {stream} from its first entry (Ctrl-C to stop)."));
    } else if last_id == "0-0" {
        note(notes, &format!("Following {stream}, empty so far (Ctrl-C to stop)."));
    } else {
        note(notes, &format!("Following {stream} after entry {last_id} (Ctrl-C to stop)."));
    }

    let mut printed: u64 = 0;
    let mut delay = opts.retry_first;
    let mut lost = false;
    loop {
        let want = match opts.count {
            Some(n) if printed >= n => return Ok(Ended::Count),
            Some(n) => (n - printed).min(BATCH),
            None => BATCH,
        };
        let read = tokio::select! {
            r = read_batch(&mut conn, redis, opts, &last_id, want) => r,
            () = &mut shutdown => return Ok(Ended::Shutdown),
        };
        let entries = match read {
            Ok(entries) => entries,
            Err(ReadError::Reply(e)) => return Err(e.into()),
            Err(ReadError::Redis(err)) if retryable(&err) => {
                conn = None;
                lost = true;
                note(
                    notes,
                    &format!(
                        "warning: lost the connection to Redis at {address} ({}); reconnecting in {}",
                        redis.describe(&err),
                        secs(delay)
                    ),
                );
                if sleep_or_shutdown(delay, &mut shutdown).await {
                    return Ok(Ended::Shutdown);
                }
                delay = (delay * 2).min(opts.retry_max);
                continue;
            }
            Err(ReadError::Redis(err)) => {
                let cause = redis.describe(&err);
                return Err(TailError::Refused { address: address.to_owned(), stream: stream.to_owned(), cause });
            }
        };
        if lost {
            note(notes, &format!("Reconnected to Redis at {address}; continuing after entry {last_id}."));
            lost = false;
            delay = opts.retry_first;
        }
        let now = bus::now_ms();
        for entry in &entries {
            let line = Line::of(stream, entry, &opts.verifier, now);
            let text = if opts.json { line.json().to_string() } else { line.text() };
            if let Err(e) = writeln!(out, "{text}") {
                return closed(e);
            }
            last_id.clone_from(&entry.id);
            printed += 1;
        }
        if let Err(e) = out.flush() {
            return closed(e);
        }
    }
}

/// A failed read: Redis's error (maybe retryable), or a reply we can't parse.
enum ReadError {
    Redis(redis::RedisError),
    Reply(BusError),
}

impl From<redis::RedisError> for ReadError {
    fn from(e: redis::RedisError) -> Self {
        ReadError::Redis(e)
    }
}

/// Connects and finds the id to read after: `0-0` from the start, else the newest entry's
/// id (`0-0` for an empty or missing stream).
async fn start(redis: &RedisEndpoint, opts: &TailOptions) -> Result<(MultiplexedConnection, String), ReadError> {
    let mut conn = redis.connect().await?;
    if opts.from_start {
        return Ok((conn, "0-0".to_owned()));
    }
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(opts.stream.as_str())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await?;
    let newest = reply::entries("XREVRANGE", &v).map_err(ReadError::Reply)?.into_iter().next();
    Ok((conn, newest.map_or_else(|| "0-0".to_owned(), |e| e.id)))
}

/// One `XREAD BLOCK` after `last_id`, connecting first when the connection was lost.
async fn read_batch(
    conn: &mut Option<MultiplexedConnection>,
    redis: &RedisEndpoint,
    opts: &TailOptions,
    last_id: &str,
    count: u64,
) -> Result<Vec<Entry>, ReadError> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(redis.connect().await?),
    };
    let v: redis::Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(opts.block.as_millis() as u64)
        .arg("STREAMS")
        .arg(opts.stream.as_str())
        .arg(last_id)
        .query_async(c)
        .await?;
    reply::read_one_stream(&v).map_err(ReadError::Reply)
}

/// True when `shutdown` completed first.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = shutdown => true,
    }
}

/// A write error: the reader going away ends the tail normally.
fn closed(e: io::Error) -> Result<Ended, TailError> {
    if e.kind() == io::ErrorKind::BrokenPipe { Ok(Ended::OutputClosed) } else { Err(TailError::Output(e)) }
}

fn note(notes: &mut impl Write, message: &str) {
    // A note that can't be shown must not stop the tail.
    let _ = writeln!(notes, "{message}");
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
