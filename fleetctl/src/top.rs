//! `fleetctl top`: the fleet live in the terminal (ratatui), refreshed every few seconds.
//!
//! What it shows, and where each figure comes from:
//! - the kill switch (state, epoch, reason) and the day's budget (tokens and money against
//!   the limits, and the burn rate: committed tokens per minute between two refreshes) —
//!   [`crate::status::gather_on`], the same reads as `fleetctl status`;
//! - tasks by state, the newest tasks and the workers' open questions — the HTTP API
//!   (`GET /v1/tasks`, `GET /v1/questions`), when a token is given; without one the panel
//!   says so;
//! - each live worker and the task it runs — verified heartbeats;
//! - every consumer group's lag and pending entries;
//! - the latest rejections (`fleet:rejected`: reason, stream, consumer) and dead letters
//!   (`fleet:dlq`: stream, deliveries, detail), newest first.
//!
//! [`Snapshot`] holds one refresh; [`draw`] renders it into any ratatui frame, so tests
//! render into a `TestBackend` and read the figures back. The terminal is restored on
//! every exit path (`q`, Esc, Ctrl-C, an error).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use bus::reply;
use clap::Args;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use serde_json::Value;

use crate::client::{ApiArgs, Client};
use crate::status::{Source, Status};

/// Arguments of `top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Where the fleet's figures come from.
    #[command(flatten)]
    pub source: Source,

    /// The API, for tasks by state (optional: without a token the panel is empty).
    #[command(flatten)]
    pub api: ApiArgs,

    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
}

/// Rejections and dead letters shown.
pub const RECENT: usize = 6;
/// Newest tasks shown.
pub const NEWEST_TASKS: usize = 8;

/// One entry of `fleet:rejected` or `fleet:dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideEntry {
    /// The entry id (its time).
    pub id: String,
    /// Rejections: the reason code; dead letters: the delivery count.
    pub what: String,
    /// The stream it was read from.
    pub stream: String,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// The detail, cut.
    pub detail: String,
}

/// One task row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: String,
    /// Its title.
    pub title: String,
}

/// The tasks panel: counts by state and the newest tasks, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tasks {
    /// Read from the API.
    Read {
        /// Tasks per state (of the newest 1,000).
        by_state: BTreeMap<String, u64>,
        /// The newest first.
        newest: Vec<TaskRow>,
        /// Open questions of workers, oldest first: (task, who asked, text).
        questions: Vec<(String, String, String)>,
    },
    /// Not read, and why.
    Unavailable(String),
}

/// One refresh.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Kill switch, budget, streams, workers.
    pub status: Status,
    /// Committed tokens per minute since the previous refresh (`None` on the first).
    pub burn_tokens_per_min: Option<u64>,
    /// Tasks.
    pub tasks: Tasks,
    /// Newest rejections first.
    pub rejections: Vec<SideEntry>,
    /// Newest dead letters first.
    pub dead_letters: Vec<SideEntry>,
}

/// The newest `n` entries of a side stream.
pub async fn side_entries(
    c: &mut bus::Conn,
    stream: &str,
    what_field: &str,
    n: usize,
) -> anyhow::Result<Vec<SideEntry>> {
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(n)
        .query_async(c)
        .await
        .with_context(|| format!("XREVRANGE {stream}"))?;
    let text =
        |e: &reply::Entry, f: &str| e.field(f).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
    Ok(reply::entries("XREVRANGE", &v)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .iter()
        .map(|e| SideEntry {
            id: e.id.clone(),
            what: text(e, what_field),
            stream: text(e, bus::names::fields::STREAM),
            consumer: text(e, bus::names::fields::CONSUMER),
            detail: telemetry::redact(&text(e, bus::names::fields::DETAIL)).chars().take(120).collect(),
        })
        .collect())
}

/// The tasks panel from the API's list.
pub fn tasks_from(list: &Value) -> Tasks {
    let Some(items) = list.get("tasks").and_then(Value::as_array) else {
        return Tasks::Unavailable("the API's answer has no task list".into());
    };
    let mut by_state = BTreeMap::new();
    for t in items {
        let state = t.get("state").and_then(Value::as_str).unwrap_or("?").to_owned();
        *by_state.entry(state).or_insert(0) += 1;
    }
    let newest = items
        .iter()
        .take(NEWEST_TASKS)
        .map(|t| TaskRow {
            id: t.get("id").and_then(Value::as_str).unwrap_or("?").to_owned(),
            state: t.get("state").and_then(Value::as_str).unwrap_or("?").to_owned(),
            title: telemetry::redact(t.get("title").and_then(Value::as_str).unwrap_or("")).chars().take(60).collect(),
        })
        .collect();
    Tasks::Read { by_state, newest, questions: Vec::new() }
}

/// The open questions from the API's list: (task, who asked, text).
pub fn questions_from(list: &Value) -> Vec<(String, String, String)> {
    list.get("questions")
        .and_then(Value::as_array)
        .map(|qs| {
            qs.iter()
                .map(|q| {
                    let s = |k: &str| q.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                    (
                        s("task_id"),
                        format!("{}/{}", s("asked_by_role"), s("asked_by_instance")),
                        telemetry::redact(&s("text")).chars().take(100).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn usd(micro: u64) -> String {
    format!("${}.{:02}", micro / 1_000_000, (micro % 1_000_000) / 10_000)
}

fn short(id: &str) -> &str {
    id.get(id.len().saturating_sub(8)..).unwrap_or(id)
}

fn table<'a>(title: &'a str, header: Vec<&'a str>, rows: Vec<Vec<String>>, widths: Vec<Constraint>) -> Table<'a> {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    Table::new(rows.into_iter().map(Row::new), widths)
        .header(Row::new(header).style(bold))
        .block(Block::default().borders(Borders::ALL).title(title))
}

/// Renders `s` into `frame`.
pub fn draw(frame: &mut Frame<'_>, s: &Snapshot) {
    let st = &s.status;
    let [head, middle, bottom] =
        Layout::vertical([Constraint::Length(4), Constraint::Percentage(50), Constraint::Fill(1)]).areas(frame.area());
    let kill = if st.kill.engaged {
        format!("KILL SWITCH ENGAGED (epoch {}): {}", st.kill.epoch, st.kill.reason.as_deref().unwrap_or(""))
    } else {
        format!("running (kill switch released, epoch {})", st.kill.epoch)
    };
    let burn = s.burn_tokens_per_min.map_or_else(|| "—".to_owned(), |b| format!("{b} tokens/min"));
    let header = vec![
        Line::from(format!("fleet: {kill}")),
        Line::from(format!(
            "budget {}: {} / {} tokens, {} / {}, burn {burn}; consecutive failures {}",
            st.day,
            st.tokens.0,
            st.limit_tokens,
            usd(st.cost.0.0),
            usd(st.limit_cost.0),
            st.failures
        )),
    ];
    frame.render_widget(
        Paragraph::new(header).block(Block::default().borders(Borders::ALL).title("agentfleet top — q quits")),
        head,
    );

    let [tasks_area, workers_area] =
        Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(middle);
    match &s.tasks {
        Tasks::Read { by_state, newest, questions } => {
            let counts: Vec<String> = by_state.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let mut rows = vec![vec![String::new(), counts.join("  "), String::new()]];
            rows.extend(newest.iter().map(|t| vec![short(&t.id).to_owned(), t.state.clone(), t.title.clone()]));
            // Questions wait for a person (`fleetctl answer TASK "…"`): shown with the tasks.
            rows.extend(
                questions
                    .iter()
                    .map(|(task, who, text)| vec![short(task).to_owned(), "QUESTION".into(), format!("{who}: {text}")]),
            );
            frame.render_widget(
                table(
                    "tasks",
                    vec!["TASK", "STATE", "TITLE"],
                    rows,
                    vec![Constraint::Length(9), Constraint::Length(12), Constraint::Fill(1)],
                ),
                tasks_area,
            );
        }
        Tasks::Unavailable(why) => frame.render_widget(
            Paragraph::new(format!("tasks: {why}")).block(Block::default().borders(Borders::ALL).title("tasks")),
            tasks_area,
        ),
    }
    let workers: Vec<Vec<String>> = st
        .workers
        .iter()
        .map(|w| {
            let doing = match (w.busy, w.task) {
                (true, Some(t)) => format!("task {}", short(&t.to_string())),
                (true, None) => "busy".into(),
                (false, _) => "idle".into(),
            };
            let age = st.now_ms.saturating_sub(w.last_seen_ms) / 1000;
            vec![w.role.to_string(), w.instance.clone(), doing, format!("{age}s")]
        })
        .collect();
    frame.render_widget(
        table(
            "workers",
            vec!["ROLE", "INSTANCE", "DOING", "SEEN"],
            workers,
            vec![Constraint::Length(9), Constraint::Fill(1), Constraint::Length(14), Constraint::Length(6)],
        ),
        workers_area,
    );

    let [streams_area, side_area] =
        Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(bottom);
    let streams: Vec<Vec<String>> = st
        .streams
        .iter()
        .flat_map(|s| {
            s.groups.iter().map(move |g| {
                vec![
                    s.name.clone(),
                    g.name.clone(),
                    g.lag.map_or_else(|| "?".into(), |l| l.to_string()),
                    g.pending.to_string(),
                ]
            })
        })
        .collect();
    frame.render_widget(
        table(
            "streams",
            vec!["STREAM", "GROUP", "LAG", "PENDING"],
            streams,
            vec![Constraint::Fill(1), Constraint::Length(13), Constraint::Length(6), Constraint::Length(8)],
        ),
        streams_area,
    );
    let mut side: Vec<Vec<String>> = s
        .rejections
        .iter()
        .map(|e| vec!["rejected".into(), e.what.clone(), e.stream.clone(), e.consumer.clone()])
        .collect();
    side.extend(
        s.dead_letters
            .iter()
            .map(|e| vec!["dead".into(), format!("{} deliveries", e.what), e.stream.clone(), e.detail.clone()]),
    );
    frame.render_widget(
        table(
            "latest rejections and dead letters",
            vec!["KIND", "WHY", "STREAM", "BY / DETAIL"],
            side,
            vec![Constraint::Length(9), Constraint::Length(16), Constraint::Length(22), Constraint::Fill(1)],
        ),
        side_area,
    );
}

/// Reads one [`Snapshot`]; `previous` gives the burn rate.
pub async fn snapshot(
    pool: &bus::RedisPool,
    opened: &crate::status::Opened,
    client: Option<&Client>,
    previous: Option<(&Snapshot, Instant)>,
) -> anyhow::Result<Snapshot> {
    let status = crate::status::gather_on(pool, &opened.verifier, opened.ledger.clone(), opened.window).await?;
    let mut c = pool.dedicated().await.context("Failed to connect to Redis")?;
    let rejections = side_entries(&mut c, envelope::streams::REJECTED, bus::names::fields::REASON, RECENT).await?;
    let dead_letters = side_entries(&mut c, envelope::streams::DLQ, bus::names::fields::DELIVERIES, RECENT).await?;
    let tasks = match client {
        None => Tasks::Unavailable("no API token (pass --token or set FLEET_TOKEN)".into()),
        Some(c) => match c.get("v1/tasks", &[("limit", "1000".to_owned())]).await {
            Ok(list) => {
                let mut tasks = tasks_from(&list);
                if let Tasks::Read { questions, .. } = &mut tasks
                    && let Ok(list) = c.get("v1/questions", &[("limit", "20".to_owned())]).await
                {
                    *questions = questions_from(&list);
                }
                tasks
            }
            Err(e) => Tasks::Unavailable(format!("{e:#}")),
        },
    };
    let burn_tokens_per_min = previous.and_then(|(p, at)| {
        let secs = at.elapsed().as_secs_f64();
        (secs > 0.0 && p.status.day == status.day)
            .then(|| (status.tokens.0.saturating_sub(p.status.tokens.0) as f64 * 60.0 / secs).round() as u64)
    });
    Ok(Snapshot { status, burn_tokens_per_min, tasks, rejections, dead_letters })
}

/// `fleetctl top`.
pub fn command(args: TopArgs) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let opened = args.source.open()?;
    let client = Client::new(&args.api).ok();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")?;
    let pool = bus::pool(opened.redis.clone(), 2, Duration::from_secs(2)).context("Invalid Redis URL")?;
    // The first read happens before the terminal is taken, so a wrong URL or keyset is a
    // plain error message, not a flash of an empty screen.
    let mut current = runtime.block_on(snapshot(&pool, &opened, client.as_ref(), None))?;
    let mut read_at = Instant::now();
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return Err(crate::exit::UsageError::new(
            "fleetctl top needs a terminal; for one look in a script use `fleetctl status` (--json)",
        )
        .into());
    }
    let mut terminal = ratatui::try_init().context("Failed to take over the terminal")?;
    let result = (|| -> anyhow::Result<()> {
        loop {
            terminal.draw(|f| draw(f, &current)).context("Failed to draw")?;
            let deadline = read_at + Duration::from_secs(args.interval);
            while Instant::now() < deadline {
                let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
                if event::poll(wait).context("Failed to read the terminal")?
                    && let Event::Key(k) = event::read().context("Failed to read the terminal")?
                    && k.kind == KeyEventKind::Press
                {
                    let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
            }
            match runtime.block_on(snapshot(&pool, &opened, client.as_ref(), Some((&current, read_at)))) {
                Ok(next) => {
                    current = next;
                    read_at = Instant::now();
                }
                // Redis away for a moment: keep the last figures and try again next round.
                Err(_) => read_at = Instant::now(),
            }
        }
    })();
    ratatui::restore();
    result
}
