//! Runs of plans (`dough go`) in the daemon: submitted, followed as an
//! event stream, cancelled; every step recorded, so that a daemon killed
//! in the middle goes on with the run when it starts again — finished
//! tasks are not run again, green ones are committed once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dough_client::types::{CreateRun, ErrorBody, Run, RunEnd, RunEvent, RunState, RunTask};
use dough_gobrr::run::{Event, Outcome, Progress};
use serde::Deserialize;

use super::api::{blocking, now_unix, page_of, ApiError, App, JsonBody, ListQuery, QueryArgs};
use super::store::{Page, RunEnding, RunRow, TaskRow};
use crate::go_cmd::{self, Hooks, Keep, LoadError};

type Shared = Arc<App>;

/// Runs going on in this daemon: their cancel switches.
#[derive(Debug, Default)]
pub struct Active(Mutex<HashMap<String, Arc<AtomicBool>>>);

fn outcome_str(o: &Outcome) -> &'static str {
    match o {
        Outcome::Green => "green",
        Outcome::Failed => "failed",
        Outcome::Blocked => "blocked",
    }
}

/// The tasks a progress holds, as rows.
fn task_rows(p: &Progress) -> Vec<TaskRow> {
    let row = |r: &dough_gobrr::run::TaskResult, outcome: &str| TaskRow {
        id: r.id.clone(),
        outcome: outcome.to_string(),
        commit: r.commit.clone(),
        attempts: r
            .attempts
            .iter()
            .map(|a| (a.n, a.green, a.failure.clone()))
            .collect(),
        result: serde_json::to_string(r).unwrap_or_default(),
    };
    p.tasks
        .values()
        .map(|r| row(r, outcome_str(&r.outcome)))
        .chain(p.pending.values().map(|x| row(&x.result, "pending")))
        .collect()
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m)
}

fn absolute(what: &str, p: &str) -> Result<PathBuf, ApiError> {
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(bad(format!("{what}: {p:?} is not an absolute path")));
    }
    Ok(path)
}

/// sha256 of a plan file (a run resumes only the plan it started with).
fn plan_sha256(plan: &FsPath) -> Result<String, ApiError> {
    use sha2::Digest;
    let bytes =
        std::fs::read(plan).map_err(|e| bad(format!("plan: reading {}: {e}", plan.display())))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

/// Run (or, with `resume`, go on with) run `id` on a thread of its own.
pub fn start(app: Shared, row: RunRow, resume: Option<Progress>) {
    let cancel = Arc::new(AtomicBool::new(row.cancel_requested));
    {
        let mut active = app.runs.0.lock().unwrap_or_else(|p| p.into_inner());
        if active.contains_key(&row.id) {
            eprintln!("dough: run {} is running already", row.id);
            return;
        }
        active.insert(row.id.clone(), cancel.clone());
    }
    let spawned = std::thread::Builder::new()
        .name(format!("run-{}", row.id))
        .spawn(move || {
            let id = row.id.clone();
            let ending = run(&app, &row, resume, &cancel);
            if let Err(e) = app.store.end_run(&id, &ending) {
                eprintln!("dough: run {id}: recording its end failed: {e:?}");
            }
            eprintln!("dough: run {id} ended: {:?}", ending.state);
            app.runs
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    if let Err(e) = spawned {
        eprintln!("dough: cannot start a thread for a run: {e}");
    }
}

fn run(app: &App, row: &RunRow, resume: Option<Progress>, cancel: &AtomicBool) -> RunEnding {
    let failed = |e: String| RunEnding {
        state: RunState::Failed,
        at: now_unix(),
        result: None,
        report: None,
        error: Some(dough_fabric::serial::printable(&e)),
    };
    // Resumed only on the plan it started with: its progress counts the
    // plan's rounds and tasks.
    if let Some(want) = &row.plan_sha256 {
        match plan_sha256(FsPath::new(&row.plan)) {
            Ok(got) if &got == want => {}
            Ok(_) => {
                return failed(format!(
                    "the plan {} changed since the run started; start a new run",
                    row.plan
                ))
            }
            Err(e) => return failed(e.message().to_string()),
        }
    }
    let loaded = match go_cmd::load(FsPath::new(&row.plan), row.repo.as_deref().map(FsPath::new)) {
        Ok(l) => l,
        Err(LoadError::Problems(p)) => {
            return failed(format!("the plan has problems: {}", p.join("; ")))
        }
        Err(LoadError::Other(e)) => return failed(format!("{e:#}")),
    };
    let store = &app.store;
    let on_event = |e: &Event| {
        if let Ok(body) = serde_json::to_string(e) {
            if let Err(err) = store.run_event(&row.id, &body) {
                eprintln!("dough: run {}: recording an event failed: {err:?}", row.id);
            }
        }
    };
    let on_progress = |p: &Progress| {
        let json = serde_json::to_string(p).unwrap_or_default();
        if let Err(err) = store.save_progress(&row.id, &json, &task_rows(p)) {
            eprintln!(
                "dough: run {}: recording its progress failed: {err:?}",
                row.id
            );
        }
    };
    let hooks = Hooks {
        resume,
        on_event: Some(&on_event),
        on_progress: Some(&on_progress),
        cancel: Some(cancel),
        daemon: true,
    };
    let done = go_cmd::execute(
        &app.ctx,
        &loaded.plan,
        loaded.secrets,
        &loaded.repo,
        &row.id,
        &app.defaults,
        Keep::Branch,
        &hooks,
    );
    match done {
        Err(e) => failed(format!("{e:#}")),
        Ok(d) => {
            let run_dir = app.ctx.home.join("runs").join(&row.id);
            let state = if cancel.load(Ordering::SeqCst) {
                RunState::Cancelled
            } else if d.result.error.is_some() {
                RunState::Failed
            } else if d.green() == d.result.tasks.len() {
                RunState::Green
            } else {
                RunState::Finished
            };
            RunEnding {
                state,
                at: now_unix(),
                // What `dough go` writes, redacted.
                result: std::fs::read_to_string(run_dir.join("run.json")).ok(),
                report: std::fs::read_to_string(&d.report).ok(),
                error: d.result.error.clone(),
            }
        }
    }
}

/// Go on with the runs a stopped daemon left running.
pub fn resume_all(app: &Shared) -> Result<(), ApiError> {
    for row in app.store.runs(&Page::all())?.unwrap_or_default() {
        if row.state != RunState::Running {
            continue;
        }
        // None recorded yet: resumed from nothing (its branch, if made,
        // is at the plan's base).
        let progress = row
            .progress
            .as_deref()
            .and_then(|p| serde_json::from_str::<Progress>(p).ok())
            .unwrap_or_default();
        app.store.resumed(&row.id)?;
        let _ = app.store.run_event(
            &row.id,
            &serde_json::to_string(&Event {
                t: 0.0,
                task: "run".into(),
                attempt: 0,
                what: "resumed after the daemon restarted".into(),
            })
            .unwrap_or_default(),
        );
        eprintln!("dough: resuming run {}", row.id);
        start(app.clone(), row, Some(progress));
    }
    Ok(())
}

fn to_api(app: &App, row: RunRow) -> Result<Run, ApiError> {
    let tasks = app
        .store
        .tasks(&row.id)?
        .into_iter()
        .map(|t| RunTask {
            id: t.id,
            outcome: t.outcome,
            commit: t.commit,
            attempts: t.attempts.len() as u32,
        })
        .collect();
    Ok(Run {
        branch: format!("dough/{}", row.id),
        id: row.id,
        state: row.state,
        plan: row.plan,
        repo: row.repo,
        created_at: row.created_at,
        ended_at: row.ended_at,
        tasks,
        resumed: row.resumed,
        error: row.error,
    })
}

fn get_row(app: &App, id: &str) -> Result<RunRow, ApiError> {
    app.store
        .run(id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no run {id:?}")))
}

/// Run ids become branch names and directory names: a safe alphabet.
fn check_run_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !id.contains("..");
    match ok {
        true => Ok(()),
        false => Err(bad(format!(
            "run_id: {id:?} must be 1-64 of A-Z a-z 0-9 - _ . (not starting with . or -)"
        ))),
    }
}

/// Start a run of a plan (a file on the daemon's host). The plan is
/// checked first: a plan with problems is refused (400) and nothing runs.
/// Secrets the plan names come from the daemon's environment.
#[utoipa::path(
    post,
    path = "/v1/runs",
    request_body = CreateRun,
    responses(
        (status = 201, body = Run),
        (status = 400, body = ErrorBody, description = "a plan with problems, or a bad field"),
        (status = 409, body = ErrorBody, description = "a run with that id exists")
    )
)]
pub async fn create(
    State(app): State<Shared>,
    JsonBody(req): JsonBody<CreateRun>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    let plan = absolute("plan", &req.plan)?;
    let repo = req
        .repo
        .as_deref()
        .map(|r| absolute("repo", r))
        .transpose()?;
    let id = req.run_id.clone().unwrap_or_else(go_cmd::new_run_id);
    check_run_id(&id)?;
    blocking(move || {
        // Checked now, so that a bad plan is a 400, not a failed run.
        match go_cmd::load(&plan, repo.as_deref()) {
            Ok(_) => {}
            Err(LoadError::Problems(p)) => {
                return Err(bad(format!("the plan has problems: {}", p.join("; "))))
            }
            Err(LoadError::Other(e)) => return Err(bad(format!("{e:#}"))),
        }
        let row = RunRow {
            id: id.clone(),
            state: RunState::Running,
            plan: plan.display().to_string(),
            repo: repo.map(|r| r.display().to_string()),
            progress: None,
            result: None,
            report: None,
            error: None,
            resumed: 0,
            plan_sha256: Some(plan_sha256(&plan)?),
            cancel_requested: false,
            created_at: now_unix(),
            ended_at: None,
        };
        // One run per id, also for two requests at once.
        if !app.store.insert_run(&row)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("a run {id} exists already"),
            ));
        }
        start(app.clone(), row.clone(), None);
        Ok((StatusCode::CREATED, Json(to_api(&app, row)?)))
    })
    .await
}

/// The runs, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/runs",
    params(ListQuery),
    responses((status = 200, body = [Run]), (status = 400, body = ErrorBody))
)]
pub async fn list(
    State(app): State<Shared>,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Json<Vec<Run>>, ApiError> {
    blocking(move || {
        let rows = page_of(app.store.runs(&q.page()?)?, &q, "run")?;
        rows.into_iter()
            .map(|r| to_api(&app, r))
            .collect::<Result<Vec<_>, _>>()
            .map(Json)
    })
    .await
}

/// One run: its state and the tasks finished so far.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    params(("id" = String, Path, description = "the run's id")),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody))
)]
pub async fn get(State(app): State<Shared>, Path(id): Path<String>) -> Result<Json<Run>, ApiError> {
    blocking(move || to_api(&app, get_row(&app, &id)?).map(Json)).await
}

/// A finished run's report (markdown): every task, attempt and check.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/report",
    params(("id" = String, Path, description = "the run's id")),
    responses(
        (status = 200, content_type = "text/markdown", body = String),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "still running, or it ended without one")
    )
)]
pub async fn report(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = blocking(move || get_row(&app, &id)).await?;
    match row.report {
        Some(r) => {
            Ok(([(header::CONTENT_TYPE, "text/markdown; charset=utf-8")], r).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            match row.state {
                RunState::Running => format!("run {} is still running", row.id),
                _ => format!(
                    "run {} ended without a report: {}",
                    row.id,
                    row.error.unwrap_or_default()
                ),
            },
        )),
    }
}

/// Cancel a run: it makes no more clones; attempts in flight end, the
/// rest fail as cancelled, what is green stays on the branch.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/cancel",
    params(("id" = String, Path, description = "the run's id")),
    responses(
        (status = 202, body = Run, description = "cancelling"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "it has ended")
    )
)]
pub async fn cancel(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    blocking(move || {
        let row = get_row(&app, &id)?;
        let flag = app
            .runs
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        match flag {
            Some(f) => {
                // Kept: a daemon restarted before the run wound down goes
                // on cancelling it.
                app.store.request_cancel(&id)?;
                f.store(true, Ordering::SeqCst)
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("run {id} is not running ({:?})", row.state),
                ))
            }
        }
        Ok((StatusCode::ACCEPTED, Json(to_api(&app, row)?)))
    })
    .await
}

/// `?after=SEQ`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events after this sequence number (default: from the start).
    after: Option<i64>,
}

/// A run's events as server-sent events: `event` (RunEvent) for each,
/// from the start (or after `?after=SEQ`, or the `Last-Event-ID` header
/// an EventSource sends when it reconnects), live while it runs, and last
/// `end` (RunEnd). Survives a daemon restart: ask again with the last
/// `seq`.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/events",
    params(("id" = String, Path, description = "the run's id"), EventsQuery),
    responses(
        (status = 200, content_type = "text/event-stream", body = String,
         description = "events `event` (RunEvent), then `end` (RunEnd)"),
        (status = 404, body = ErrorBody)
    )
)]
pub async fn events(
    State(app): State<Shared>,
    Path(id): Path<String>,
    QueryArgs(q): QueryArgs<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    // An EventSource that reconnects says where it was.
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let a = app.clone();
    let i = id.clone();
    blocking(move || get_row(&a, &i)).await?;
    struct Follow {
        app: Shared,
        id: String,
        after: i64,
        queue: std::collections::VecDeque<SseEvent>,
        ended: bool,
    }
    let start = Follow {
        app,
        id,
        after: q.after.or(last).unwrap_or(0),
        queue: Default::default(),
        ended: false,
    };
    let stream = futures::stream::unfold(start, |mut f| async move {
        loop {
            if let Some(e) = f.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), f));
            }
            if f.ended {
                return None;
            }
            let (app, id, after) = (f.app.clone(), f.id.clone(), f.after);
            // The state first: events recorded before the run ended are
            // then all read below.
            let got = tokio::task::spawn_blocking(move || {
                let state = app.store.run(&id).ok().flatten().map(|r| r.state);
                let evs = app.store.run_events(&id, after, 500).unwrap_or_default();
                (state, evs)
            })
            .await;
            let Ok((state, evs)) = got else { return None };
            let full = evs.len() == 500;
            for (seq, body) in evs {
                f.after = seq;
                let Ok(e) = serde_json::from_str::<Event>(&body) else {
                    continue;
                };
                let ev = RunEvent {
                    seq,
                    t: e.t,
                    task: e.task,
                    attempt: e.attempt,
                    what: e.what,
                };
                f.queue.push_back(
                    SseEvent::default()
                        .event("event")
                        .id(seq.to_string())
                        .data(serde_json::to_string(&ev).unwrap_or_default()),
                );
            }
            match (state, full) {
                // More to read at once.
                (_, true) => {}
                (Some(RunState::Running), false) => {
                    if f.queue.is_empty() {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                (Some(s), false) => {
                    f.queue.push_back(
                        SseEvent::default()
                            .event("end")
                            .data(serde_json::to_string(&RunEnd { state: s }).unwrap_or_default()),
                    );
                    f.ended = true;
                }
                // The run is gone from the database.
                (None, false) => f.ended = true,
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
