//! The HTTP API's routes and handlers, and its OpenAPI document (built
//! from the handlers' annotations and the body types in `dough-client`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use dough_client::types::*;
use dough_fabric::{ExecRequest, Signaller};
use dough_proto::{ExitStatus, Stream};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use utoipa::OpenApi;

use super::store::{SandboxRow, Store};
use super::Metrics;
use crate::cli::Ctx;

/// Sizes the daemon accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A JSON request body.
    pub max_request: usize,
    /// A file or tar stream moved into or out of a sandbox.
    pub max_file: u64,
    /// Entries `stat` lists of a directory.
    pub max_entries: usize,
}

/// What every handler shares.
pub struct App {
    pub ctx: Ctx,
    pub store: Arc<dyn Store>,
    pub token: String,
    pub limits: Limits,
    /// VM options a sandbox gets unless its request says otherwise.
    pub defaults: crate::vm_args::VmArgs,
    pub metrics: Metrics,
    /// Runs going on in this daemon.
    pub runs: super::runs::Active,
    /// Sandboxes being torn down (the reconcile loop leaves them alone).
    pub deleting: Mutex<std::collections::HashSet<String>>,
    /// Running execs by id: their sandbox and how to signal them.
    execs: Mutex<HashMap<String, (String, Arc<Signaller>)>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("ctx", &self.ctx)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl App {
    pub fn new(
        ctx: Ctx,
        store: Arc<dyn Store>,
        token: String,
        limits: Limits,
        defaults: crate::vm_args::VmArgs,
    ) -> App {
        App {
            ctx,
            store,
            token,
            limits,
            defaults,
            metrics: Metrics::default(),
            runs: Default::default(),
            deleting: Mutex::default(),
            execs: Mutex::default(),
        }
    }
}

type Shared = Arc<App>;

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
    /// An error with its causes, made printable (guests say some of it).
    fn chain(status: StatusCode, code: &'static str, e: &anyhow::Error) -> ApiError {
        ApiError::new(
            status,
            code,
            dough_fabric::serial::printable(&format!("{e:#}")),
        )
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    fn info(&self) -> ErrorInfo {
        ErrorInfo {
            code: self.code.into(),
            message: self.message.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(ErrorBody { error: self.info() })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<super::store::StoreError> for ApiError {
    fn from(e: super::store::StoreError) -> ApiError {
        ApiError::chain(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.into())
    }
}

/// A JSON body whose every rejection is an [`ApiError`].
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::too_large(r.body_text()))
            }
            Err(r) => Err(ApiError::bad(r.body_text())),
        }
    }
}

/// Query parameters whose rejection is an [`ApiError`].
pub struct QueryArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| QueryArgs(v))
            .map_err(|r| ApiError::bad(r.body_text()))
    }
}

/// The most rows one list request returns, and the number when it does
/// not say.
pub const LIST_MAX: u32 = 1000;
pub const LIST_DEFAULT: u32 = 100;

/// `?limit=N&before=ID`: one page of a list, newest first. A page shorter
/// than `limit` is the last; otherwise ask again with `before` = the last
/// id of this page.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many (1 to 1000; default 100).
    pub limit: Option<u32>,
    /// Only those listed after this id (the last of the previous page).
    pub before: Option<String>,
}

/// `?limit=N&before=ID&live=true`: a page of the sandboxes.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SandboxListQuery {
    /// At most this many (1 to 1000; default 100).
    pub limit: Option<u32>,
    /// Only those listed after this id (the last of the previous page).
    pub before: Option<String>,
    /// `true`: live ones only (default: ended ones too).
    pub live: Option<bool>,
}

impl ListQuery {
    pub fn page(&self) -> Result<super::store::Page, ApiError> {
        let limit = self.limit.unwrap_or(LIST_DEFAULT);
        if !(1..=LIST_MAX).contains(&limit) {
            return Err(ApiError::bad(format!(
                "limit must be 1 to {LIST_MAX} (got {limit}): page with `before`"
            )));
        }
        Ok(super::store::Page {
            before: self.before.clone(),
            limit: Some(limit),
        })
    }
}

/// A page's rows, or why there is none: `before` named nothing.
pub fn page_of<T>(rows: Option<Vec<T>>, q: &ListQuery, what: &str) -> Result<Vec<T>, ApiError> {
    rows.ok_or_else(|| {
        ApiError::bad(format!(
            "before={:?} is not a {what} (page with an id from the previous page)",
            q.before.as_deref().unwrap_or_default()
        ))
    })
}

/// Refuse requests without the daemon's token (compared in constant time).
async fn auth(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let ok = given.is_some_and(|t| bool::from(t.ct_eq(app.token.as_bytes())));
    if !ok {
        app.metrics
            .requests_refused_auth
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let refused = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this request needs the daemon's token: `Authorization: Bearer <token>` \
             (the token is in the daemon's token file, $DOUGH_HOME/serve.token by default)",
        )
        .into_response();
        // Nor may it keep the connection (a slot of --max-connections).
        let mut refused = refused;
        refused
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return refused;
    }
    next.run(req).await
}

/// The API's routes, every one behind the token.
pub fn router(app: Shared) -> Router {
    let max = app.limits.max_request;
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/version", get(version))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics))
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route(
            "/v1/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route(
            "/v1/sandboxes/{id}/execs/{exec_id}/signal",
            post(signal_exec),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(super::files::download).put(super::files::upload),
        )
        .route("/v1/sandboxes/{id}/stat", get(super::files::stat))
        .route("/v1/runs", post(super::runs::create).get(super::runs::list))
        .route("/v1/runs/{id}", get(super::runs::get))
        .route("/v1/runs/{id}/events", get(super::runs::events))
        .route("/v1/runs/{id}/report", get(super::runs::report))
        .route("/v1/runs/{id}/cancel", post(super::runs::cancel))
        .fallback(|| async { ApiError::not_found("no such route (GET /openapi.json lists them)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method (GET /openapi.json lists them)",
            )
        })
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(max))
        .with_state(app)
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dough",
        description = "Sandboxes (microVM clones) and the commands and files in them. \
                       Every request needs `Authorization: Bearer <token>`. Errors are \
                       `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        health,
        version,
        metrics,
        create_sandbox,
        list_sandboxes,
        get_sandbox,
        delete_sandbox,
        exec,
        signal_exec,
        super::files::upload,
        super::files::download,
        super::files::stat,
        super::runs::create,
        super::runs::list,
        super::runs::get,
        super::runs::events,
        super::runs::report,
        super::runs::cancel
    ),
    components(schemas(
        CreateSandbox,
        Sandbox,
        SandboxState,
        ExecBody,
        ExecStart,
        ExecOutput,
        ExecExit,
        SignalBody,
        Signalled,
        ErrorBody,
        ErrorInfo,
        Health,
        Version,
        FileStat,
        FileKind,
        DirEntry,
        Uploaded,
        CreateRun,
        Run,
        RunState,
        RunTask,
        RunEvent,
        RunEnd
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON text.
pub fn openapi_text() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_text()).into_response()
}

/// Run blocking work (VMs, the database) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

/// Liveness, and how many sandboxes are live.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
async fn health(State(app): State<Shared>) -> Result<Json<Health>, ApiError> {
    let n = blocking(move || {
        Ok(app
            .store
            .sandboxes(true, &super::store::Page::all())?
            .map_or(0, |v| v.len() as u64))
    })
    .await?;
    Ok(Json(Health {
        status: "ok".into(),
        sandboxes: n,
    }))
}

/// dough's version and the API's.
#[utoipa::path(get, path = "/v1/version", responses((status = 200, body = Version)))]
async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").into(),
        api: API_VERSION,
    })
}

/// Prometheus text: sandboxes by state, restore latency, execs and their
/// durations, bytes shipped, bakes.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(app): State<Shared>) -> Result<Response, ApiError> {
    let text = blocking(move || {
        let mut by: std::collections::BTreeMap<String, u64> = Default::default();
        let live = app
            .store
            .sandboxes(true, &super::store::Page::all())?
            .unwrap_or_default();
        let recs = records(&app);
        for s in live.into_iter().map(|r| to_api(r, &recs)) {
            *by.entry(s.vm_state.unwrap_or_else(|| "gone".into()))
                .or_default() += 1;
        }
        let counts = app.store.counts()?;
        Ok(app
            .metrics
            .render(&by.into_iter().collect::<Vec<_>>(), &counts))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// A row as the API shows it, with its VM's state while live.
fn to_api(row: SandboxRow, records: &HashMap<String, dough_fabric::VmRecord>) -> Sandbox {
    let vm_state = (row.state == SandboxState::Live).then(|| match records.get(&row.id) {
        Some(r) if r.vmm.is_some_and(|v| !v.is_alive()) => "dead".to_string(),
        Some(r) => r.state.to_string(),
        None => "gone".into(),
    });
    Sandbox {
        id: row.id,
        state: row.state,
        vm_state,
        snapshot: row.snapshot,
        image: row.image,
        net: row.net,
        memory_mib: row.memory_mib,
        vcpus: row.vcpus,
        created_at: row.created_at,
        expires_at: row.expires_at,
        ended_at: row.ended_at,
        ended_why: row.ended_why,
    }
}

fn records(app: &App) -> HashMap<String, dough_fabric::VmRecord> {
    dough_fabric::state::list(&app.ctx.vms)
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect()
}

fn sandboxes_now(app: &App, q: &SandboxListQuery) -> Result<Vec<Sandbox>, ApiError> {
    let list = ListQuery {
        limit: q.limit,
        before: q.before.clone(),
    };
    let rows = app.store.sandboxes(q.live == Some(true), &list.page()?)?;
    let rows = page_of(rows, &list, "sandbox")?;
    let recs = records(app);
    Ok(rows.into_iter().map(|r| to_api(r, &recs)).collect())
}

/// The live sandbox `id` (exactly: never a prefix, never a VM the daemon
/// did not make).
pub fn live_row(app: &App, id: &str) -> Result<SandboxRow, ApiError> {
    match app.store.sandbox(id)? {
        None => Err(ApiError::not_found(format!("no sandbox {id:?}"))),
        Some(r) if r.state != SandboxState::Live => Err(ApiError::new(
            StatusCode::GONE,
            "gone",
            format!(
                "sandbox {id} has ended: {}",
                r.ended_why.as_deref().unwrap_or("-")
            ),
        )),
        Some(r) => Ok(r),
    }
}

pub fn now_unix() -> i64 {
    dough_fabric::state::now_unix() as i64
}

/// Create a sandbox: a clone of the image's warm snapshot (baked first if
/// needed) or of a saved snapshot. Answers once its agent is ready.
#[utoipa::path(
    post,
    path = "/v1/sandboxes",
    request_body = CreateSandbox,
    responses(
        (status = 201, body = Sandbox),
        (status = 400, body = ErrorBody, description = "a bad field, or an image or snapshot that does not exist"),
        (status = 500, body = ErrorBody, description = "the VM failed to start")
    )
)]
async fn create_sandbox(
    State(app): State<Shared>,
    JsonBody(req): JsonBody<CreateSandbox>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let sb = blocking(move || {
        let row = super::sandboxes::create(&app, &req)?;
        Ok(to_api(row, &records(&app)))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(sb)))
}

/// The sandboxes the daemon made, newest first (ended ones too, with why,
/// unless `live=true`), a page at a time.
#[utoipa::path(
    get,
    path = "/v1/sandboxes",
    params(SandboxListQuery),
    responses((status = 200, body = [Sandbox]), (status = 400, body = ErrorBody))
)]
async fn list_sandboxes(
    State(app): State<Shared>,
    QueryArgs(q): QueryArgs<SandboxListQuery>,
) -> Result<Json<Vec<Sandbox>>, ApiError> {
    Ok(Json(blocking(move || sandboxes_now(&app, &q)).await?))
}

/// One sandbox.
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}",
    params(("id" = String, Path, description = "the sandbox's id")),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody))
)]
async fn get_sandbox(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    blocking(move || match app.store.sandbox(&id)? {
        Some(r) => Ok(Json(to_api(r, &records(&app)))),
        None => Err(ApiError::not_found(format!("no sandbox {id:?}"))),
    })
    .await
}

/// Destroy a sandbox: its VM is stopped and everything of it removed.
#[utoipa::path(
    delete,
    path = "/v1/sandboxes/{id}",
    params(("id" = String, Path, description = "the sandbox's id")),
    responses(
        (status = 204, description = "destroyed"),
        (status = 404, body = ErrorBody),
        (status = 410, body = ErrorBody, description = "it had already ended")
    )
)]
async fn delete_sandbox(
    State(app): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || {
        let row = live_row(&app, &id)?;
        super::sandboxes::destroy(&app, &row.id, "deleted through the API")?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// One event of an exec stream.
fn event<T: serde::Serialize>(name: &str, data: &T) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).expect("serializable"))
}

fn exit_of(status: &ExitStatus) -> (ExecExit, &'static str) {
    let code = status.shell_code();
    match status {
        ExitStatus::Exited(_) => (
            ExecExit {
                exit_code: code,
                signal: None,
                timed_out: false,
                spawn_error: None,
            },
            "exited",
        ),
        ExitStatus::Signaled(s) => (
            ExecExit {
                exit_code: code,
                signal: Some(*s),
                timed_out: false,
                spawn_error: None,
            },
            "signaled",
        ),
        ExitStatus::TimedOut => (
            ExecExit {
                exit_code: code,
                signal: None,
                timed_out: true,
                spawn_error: None,
            },
            "timed_out",
        ),
        ExitStatus::SpawnFailed(why) => (
            ExecExit {
                exit_code: code,
                signal: None,
                timed_out: false,
                spawn_error: Some(dough_fabric::serial::printable(why)),
            },
            "spawn_failed",
        ),
    }
}

/// The request a body asks for, checked.
fn exec_request(body: ExecBody) -> Result<ExecRequest, ApiError> {
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(ApiError::bad("argv: give the program and its arguments"));
    }
    let stdin = match (body.stdin, body.stdin_b64) {
        (Some(_), Some(_)) => return Err(ApiError::bad("give stdin or stdin_b64, not both")),
        (Some(t), None) => Some(t.into_bytes()),
        (None, Some(b)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| ApiError::bad(format!("stdin_b64: {e}")))?,
        ),
        (None, None) => None,
    };
    let timeout = match body.timeout_secs {
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(ApiError::bad(format!(
                "timeout_secs must be a positive number of seconds, got {t}"
            )))
        }
        None => None,
    };
    for k in body.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::bad(format!("env: {k:?} is not a variable name")));
        }
    }
    Ok(ExecRequest {
        argv: body.argv,
        env: body.env.into_iter().collect(),
        cwd: body.cwd,
        stdin,
        timeout,
    })
}

/// Run a command. The answer is a stream of server-sent events: `start`
/// (the exec's id, to signal it by), `stdout` and `stderr` (base64 of the
/// bytes, as they come), and last `exit` (how it ended) or `error` (the
/// sandbox failed). A client that goes away kills the command.
#[utoipa::path(
    post,
    path = "/v1/sandboxes/{id}/exec",
    params(("id" = String, Path, description = "the sandbox's id")),
    request_body = ExecBody,
    responses(
        (status = 200, content_type = "text/event-stream", body = String,
         description = "events `start` (ExecStart), `stdout`/`stderr` (ExecOutput), then `exit` (ExecExit) or `error` (ErrorInfo)"),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 410, body = ErrorBody)
    )
)]
async fn exec(
    State(app): State<Shared>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let may_be_secret: Vec<String> = body
        .env
        .keys()
        .map(|k| format!("${k} through the API"))
        .chain(
            (body.stdin.is_some() || body.stdin_b64.is_some())
                .then(|| "stdin through the API".to_string()),
        )
        .collect();
    let req = exec_request(body)?;
    let a = app.clone();
    let id = blocking(move || {
        let row = live_row(&a, &id)?;
        // Recorded before it is sent: a sandbox that got any of it is
        // never snapshotted.
        dough_fabric::pool::note_received(&a.ctx.vms, &row.id, &may_be_secret)
            .map_err(|e| ApiError::chain(StatusCode::CONFLICT, "conflict", &e.into()))?;
        Ok(row.id)
    })
    .await?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let exec_id = format!("ex-{}", dough_fabric::new_vm_id().trim_start_matches("vm-"));
    let watch = Arc::new(Watch::default());
    let w = watch.clone();
    tokio::task::spawn_blocking(move || run_exec(&app, &id, &exec_id, &req, tx, &w));
    // The stream owns the guard: dropped (the client went away) before
    // the command ended, it kills the command — a silent one too.
    let events = futures::stream::unfold((rx, Guard(watch)), |(mut rx, g)| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), (rx, g)))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// An exec's command and whether its client is still there.
#[derive(Default)]
struct Watch {
    signaller: std::sync::OnceLock<Arc<Signaller>>,
    /// The client went away.
    gone: AtomicBool,
    /// The command ended (nothing to kill).
    done: AtomicBool,
}

impl Watch {
    /// SIGKILL the command, if it started (off this thread: a write to
    /// the channel may wait).
    fn kill(&self) {
        if let Some(s) = self.signaller.get() {
            let s = s.clone();
            std::thread::spawn(move || {
                let _ = s.signal(9);
            });
        }
    }
}

/// Held by an exec's event stream; dropped early, it kills the command.
struct Guard(Arc<Watch>);

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.0.done.load(Ordering::SeqCst) {
            self.0.gone.store(true, Ordering::SeqCst);
            self.0.kill();
        }
    }
}

/// The blocking half of [`exec`]: runs the command, sends its events.
fn run_exec(
    app: &App,
    id: &str,
    exec_id: &str,
    req: &ExecRequest,
    tx: mpsc::Sender<Event>,
    watch: &Watch,
) {
    let start = Instant::now();
    let mut started = |s: Signaller| {
        let s = Arc::new(s);
        app.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(exec_id.to_string(), (id.to_string(), s.clone()));
        let _ = watch.signaller.set(s);
        if watch.gone.load(Ordering::SeqCst) {
            // Its client left while it waited for its turn.
            watch.kill();
        }
        let _ = tx.blocking_send(event(
            "start",
            &ExecStart {
                exec_id: exec_id.to_string(),
            },
        ));
    };
    let mut gone = false;
    let mut sink = |stream: Stream, data: &[u8]| {
        let name = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        let ev = event(
            name,
            &ExecOutput {
                data: base64::engine::general_purpose::STANDARD.encode(data),
            },
        );
        if tx.blocking_send(ev).is_err() && !gone {
            // Nobody is reading: the command is killed, not left running.
            gone = true;
            watch.kill();
        }
    };
    let r = dough_fabric::pool::exec_with(
        &app.ctx.vms,
        id,
        req,
        dough_fabric::pool::Exec {
            stdin: None,
            started: Some(&mut started),
        },
        &mut sink,
        &mut |_| {},
    );
    app.execs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(exec_id);
    watch.done.store(true, Ordering::SeqCst);
    match r {
        Ok(status) => {
            let (exit, result) = exit_of(&status);
            app.metrics.exec_done(result, start.elapsed());
            let _ = tx.blocking_send(event("exit", &exit));
        }
        Err(e) => {
            app.metrics.exec_done("error", start.elapsed());
            let e = ApiError::chain(StatusCode::INTERNAL_SERVER_ERROR, "unavailable", &e.into());
            let _ = tx.blocking_send(event("error", &e.info()));
        }
    }
}

/// Send a signal to a running exec's processes.
#[utoipa::path(
    post,
    path = "/v1/sandboxes/{id}/execs/{exec_id}/signal",
    params(
        ("id" = String, Path, description = "the sandbox's id"),
        ("exec_id" = String, Path, description = "from the exec's `start` event")
    ),
    request_body = SignalBody,
    responses((status = 200, body = Signalled), (status = 404, body = ErrorBody))
)]
async fn signal_exec(
    State(app): State<Shared>,
    Path((id, exec_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<SignalBody>,
) -> Result<Json<Signalled>, ApiError> {
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::bad(format!(
            "signal: {} is not a signal number (1-64)",
            body.signal
        )));
    }
    let s = {
        let execs = app.execs.lock().unwrap_or_else(|p| p.into_inner());
        match execs.get(&exec_id) {
            Some((sb, s)) if *sb == id => s.clone(),
            _ => {
                return Err(ApiError::not_found(format!(
                    "no exec {exec_id:?} running in sandbox {id:?}"
                )))
            }
        }
    };
    blocking(move || {
        s.signal(body.signal).map_err(|e| {
            ApiError::chain(StatusCode::INTERNAL_SERVER_ERROR, "unavailable", &e.into())
        })
    })
    .await?;
    // Sent, or queued to follow the command if it has not gone out yet.
    Ok(Json(Signalled { delivered: true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_bodies_are_checked() {
        let ok = |b: ExecBody| exec_request(b).map(|r| (r.argv, r.stdin, r.timeout));
        let body = |argv: &[&str]| ExecBody {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(ok(body(&[])).unwrap_err().code, "bad_request");
        assert_eq!(ok(body(&[""])).unwrap_err().code, "bad_request");
        let mut b = body(&["cat"]);
        b.stdin_b64 = Some("aGk=".into());
        assert_eq!(ok(b).unwrap().1, Some(b"hi".to_vec()));
        let mut b = body(&["cat"]);
        b.stdin = Some("a".into());
        b.stdin_b64 = Some("YQ==".into());
        assert_eq!(ok(b).unwrap_err().code, "bad_request");
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e12] {
            let mut b = body(&["true"]);
            b.timeout_secs = Some(t);
            assert_eq!(ok(b).unwrap_err().code, "bad_request", "{t}");
        }
        let mut b = body(&["true"]);
        b.env.insert("A=B".into(), "x".into());
        assert_eq!(ok(b).unwrap_err().code, "bad_request");
    }

    #[test]
    fn the_document_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_text()).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/health",
            "/v1/version",
            "/metrics",
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/exec",
            "/v1/sandboxes/{id}/execs/{exec_id}/signal",
            "/v1/sandboxes/{id}/files",
            "/v1/sandboxes/{id}/stat",
            "/v1/runs",
            "/v1/runs/{id}",
            "/v1/runs/{id}/events",
            "/v1/runs/{id}/report",
            "/v1/runs/{id}/cancel",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }
}
