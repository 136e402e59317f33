//! Files into and out of sandboxes, streamed: an upload is read from the
//! request as the guest takes it, a download sent as the guest writes it;
//! neither is held whole, and both stop at the daemon's size limit.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dough_client::types::{DirEntry, ErrorBody, FileKind, FileStat, Uploaded};
use dough_fabric::{ExecRequest, Signaller};
use dough_proto::{ExitStatus, Stream};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::api::{blocking, live_row, ApiError, App, QueryArgs};

type Shared = Arc<App>;

/// `?path=/abs/path[&format=tar]`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// An absolute path in the sandbox.
    path: String,
    /// `file` (default) or `tar`: a directory as a tar stream (download),
    /// or a tar stream unpacked into the directory (upload).
    format: Option<String>,
}

/// `?path=/abs/path`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatQuery {
    /// An absolute path in the sandbox.
    path: String,
}

/// How long an upload may go without a byte before it is broken off.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a `stat` may take in the guest.
const STAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn check_path(p: &str) -> Result<(), ApiError> {
    if !p.starts_with('/') || p.contains('\0') || p.len() > 4096 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("path: {p:?} is not an absolute path"),
        ));
    }
    Ok(())
}

fn tar_format(f: &Option<String>) -> Result<bool, ApiError> {
    match f.as_deref() {
        None | Some("file") => Ok(false),
        Some("tar") => Ok(true),
        Some(o) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("format: {o:?} is not file or tar"),
        )),
    }
}

fn sh(script: &str, args: &[&str]) -> ExecRequest {
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        script.into(),
        "sh".into(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    ExecRequest {
        argv,
        ..Default::default()
    }
}

fn unavailable(e: dough_fabric::FabricError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "unavailable",
        dough_fabric::serial::printable(&format!("{:#}", anyhow::Error::from(e))),
    )
}

/// Run a small command, keeping at most `limit` bytes of each stream.
fn collect(
    app: &App,
    id: &str,
    req: &ExecRequest,
    limit: usize,
) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), ApiError> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = dough_fabric::pool::exec(
        &app.ctx.vms,
        id,
        req,
        &mut |s, d| {
            let b = match s {
                Stream::Stdout => &mut out,
                Stream::Stderr => &mut err,
            };
            let room = limit.saturating_sub(b.len());
            b.extend_from_slice(&d[..d.len().min(room)]);
        },
        &mut |_| {},
    )
    .map_err(unavailable)?;
    Ok((status, out, err))
}

fn guest_said(b: &[u8]) -> String {
    dough_fabric::serial::printable(String::from_utf8_lossy(b).trim())
}

/// A request body as a blocking reader, fed by an async task that stops
/// (setting `too_large`) once more than the limit came.
struct BodyReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Write a file (the body's bytes) at `path`, making its directory; or,
/// with `format=tar`, unpack the body (a tar stream) into directory
/// `path`. Over the daemon's file limit: 413, and a file written so far is
/// removed (a tar stream may leave what it had unpacked).
#[utoipa::path(
    put,
    path = "/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "the sandbox's id"), FileQuery),
    request_body(content = String, content_type = "application/octet-stream",
                 description = "the file's bytes, or a tar stream"),
    responses(
        (status = 201, body = Uploaded),
        (status = 400, body = ErrorBody, description = "a bad path, or the guest could not write it"),
        (status = 413, body = ErrorBody, description = "over the daemon's file limit")
    )
)]
pub async fn upload(
    State(app): State<Shared>,
    Path(id): Path<String>,
    QueryArgs(q): QueryArgs<FileQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Uploaded>), ApiError> {
    check_path(&q.path)?;
    let tar = tar_format(&q.format)?;
    let max = app.limits.max_file;
    let too_large = move || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("an upload may be at most {max} bytes (dough serve --max-file)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let a = app.clone();
    let row = blocking(move || live_row(&a, &id)).await?;
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let over = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let broken = Arc::new(AtomicBool::new(false));
    let (over2, total2, broken2) = (over.clone(), total.clone(), broken.clone());
    let mut data = body.into_data_stream();
    tokio::spawn(async move {
        loop {
            // A client that stops sending (but keeps its connection) must
            // not hold the sandbox: a minute without a byte breaks it off.
            let chunk = match tokio::time::timeout(BODY_IDLE, data.next()).await {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(_) => {
                    broken2.store(true, Ordering::SeqCst);
                    return;
                }
            };
            let item = match chunk {
                Ok(b) => {
                    let n = total2.fetch_add(b.len() as u64, Ordering::SeqCst) + b.len() as u64;
                    if n > max {
                        over2.store(true, Ordering::SeqCst);
                        None
                    } else {
                        Some(b)
                    }
                }
                Err(_) => {
                    broken2.store(true, Ordering::SeqCst);
                    None
                }
            };
            // Over the limit or a broken request: the guest's stdin just
            // ends (no half-sent stream), and the partial result is removed.
            let Some(item) = item else { return };
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
    });
    let path = q.path.clone();
    // A file is written under a name of its own and moved over `path` only
    // when all of it came: a failed upload leaves what was there.
    let temp = format!(
        "{}.dough-upload-{}",
        q.path,
        dough_fabric::new_vm_id().trim_start_matches("vm-")
    );
    blocking(move || {
        let req = if tar {
            sh(
                "mkdir -p -- \"$1\" && exec tar -x -f - --no-same-owner -C \"$1\"",
                &[&path],
            )
        } else {
            sh(
                "mkdir -p -- \"$(dirname -- \"$1\")\" && exec cat > \"$2\"",
                &[&path, &temp],
            )
        };
        let mut reader = BodyReader {
            rx,
            cur: Bytes::new(),
        };
        let mut err = Vec::new();
        let r = dough_fabric::pool::exec_with(
            &app.ctx.vms,
            &row.id,
            &req,
            dough_fabric::pool::Exec {
                stdin: Some(&mut reader),
                started: None,
            },
            &mut |s, d| {
                if s == Stream::Stderr && err.len() < 4096 {
                    err.extend_from_slice(d);
                }
            },
            &mut |_| {},
        );
        let n = total.load(Ordering::SeqCst);
        let (over, broken) = (over.load(Ordering::SeqCst), broken.load(Ordering::SeqCst));
        if over || broken {
            if !tar {
                let _ = collect(&app, &row.id, &sh("rm -f -- \"$1\"", &[&temp]), 0);
            }
            return Err(if over {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the request body broke off; nothing was kept",
                )
            });
        }
        let status = r.map_err(unavailable)?;
        let mut failed = status != ExitStatus::Exited(0);
        if !failed && !tar {
            let (st, _, e) = collect(
                &app,
                &row.id,
                &sh("exec mv -f -- \"$2\" \"$1\"", &[&path, &temp]),
                4096,
            )?;
            if st != ExitStatus::Exited(0) {
                failed = true;
                err = e;
            }
        }
        if failed {
            if !tar {
                let _ = collect(&app, &row.id, &sh("rm -f -- \"$1\"", &[&temp]), 0);
            }
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the sandbox could not write {path}: {}", guest_said(&err)),
            ));
        }
        app.metrics.bytes_up.fetch_add(n, Ordering::Relaxed);
        Ok((StatusCode::CREATED, Json(Uploaded { path, bytes: n })))
    })
    .await
}

/// What `stat` says of a path: kind and size.
fn kind_of(stat_f: &str) -> FileKind {
    match stat_f {
        "regular file" | "regular empty file" => FileKind::File,
        "directory" => FileKind::Dir,
        "symbolic link" => FileKind::Symlink,
        _ => FileKind::Other,
    }
}

fn kind_of_find(y: &str) -> FileKind {
    match y {
        "f" => FileKind::File,
        "d" => FileKind::Dir,
        "l" => FileKind::Symlink,
        _ => FileKind::Other,
    }
}

/// The guest's answer to [`STAT_SCRIPT`], parsed; `None` when it makes no
/// sense (a guest decides what it says).
fn parse_stat(path: &str, out: &[u8], max_entries: usize) -> Option<FileStat> {
    let nl = out.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&out[..nl]).ok()?;
    let f: Vec<&str> = head.splitn(4, '|').collect();
    let [kind, size, mode, mtime] = f[..] else {
        return None;
    };
    let kind = kind_of(kind);
    let mut st = FileStat {
        path: path.to_string(),
        kind,
        size: size.parse().ok()?,
        mode: u32::from_str_radix(mode, 8).ok()?,
        mtime: mtime.parse().ok()?,
        entries: None,
    };
    if kind == FileKind::Dir {
        let mut entries = Vec::new();
        for e in out[nl + 1..].split(|&b| b == 0).filter(|e| !e.is_empty()) {
            if entries.len() >= max_entries {
                break;
            }
            let e = String::from_utf8_lossy(e);
            let f: Vec<&str> = e.splitn(5, '|').collect();
            let [y, size, mode, mtime, name] = f[..] else {
                return None;
            };
            entries.push(DirEntry {
                name: name.to_string(),
                kind: kind_of_find(y),
                size: size.parse().ok()?,
                mode: u32::from_str_radix(mode, 8).ok()?,
                mtime: mtime.split('.').next()?.parse().ok()?,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        st.entries = Some(entries);
    }
    Some(st)
}

/// Prints `KIND|SIZE|MODE|MTIME\n` for "$1" (what a symlink points to
/// when "$3" is `-L`), then for a directory up to "$2" entries as
/// `Y|SIZE|MODE|MTIME|NAME\0`; exits 3 when there is no such path.
const STAT_SCRIPT: &str = "stat $3 -c '%F|%s|%a|%Y' -- \"$1\" || exit 3
if [ -d \"$1\" ] && { [ -n \"$3\" ] || [ ! -L \"$1\" ]; }; then
  find \"$1\" -mindepth 1 -maxdepth 1 -printf '%y|%s|%m|%T@|%f\\0' | head -z -n \"$2\"
fi";

/// What `path` is (with `follow`, what a symlink there points to).
fn stat_in(app: &App, id: &str, path: &str, follow: bool) -> Result<FileStat, ApiError> {
    let max = app.limits.max_entries;
    let flag = if follow { "-L" } else { "" };
    let mut req = sh(STAT_SCRIPT, &[path, &max.to_string(), flag]);
    req.timeout = Some(STAT_TIMEOUT);
    let (status, out, err) = collect(app, id, &req, (max + 1) * 4200)?;
    match status {
        ExitStatus::Exited(0) => {}
        ExitStatus::Exited(3) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{path}: {}", guest_said(&err)),
            ))
        }
        other => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "unavailable",
                format!("stat {path} ended {other:?}: {}", guest_said(&err)),
            ))
        }
    }
    parse_stat(path, &out, max).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unavailable",
            format!("the sandbox's answer about {path} made no sense"),
        )
    })
}

/// What a path is; a directory's entries (up to the daemon's limit,
/// sorted by name).
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}/stat",
    params(("id" = String, Path, description = "the sandbox's id"), StatQuery),
    responses((status = 200, body = FileStat), (status = 404, body = ErrorBody))
)]
pub async fn stat(
    State(app): State<Shared>,
    Path(id): Path<String>,
    QueryArgs(q): QueryArgs<StatQuery>,
) -> Result<Json<FileStat>, ApiError> {
    check_path(&q.path)?;
    blocking(move || {
        let row = live_row(&app, &id)?;
        stat_in(&app, &row.id, &q.path, false).map(Json)
    })
    .await
}

/// A file's bytes, or (`format=tar`) a directory as a tar stream, sent as
/// the guest reads them. A file over the daemon's limit is refused (413);
/// a tar stream that grows past it is cut off (the response ends early).
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}/files",
    params(("id" = String, Path, description = "the sandbox's id"), FileQuery),
    responses(
        (status = 200, content_type = "application/octet-stream", body = String),
        (status = 400, body = ErrorBody, description = "a directory without format=tar, or a bad path"),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody)
    )
)]
pub async fn download(
    State(app): State<Shared>,
    Path(id): Path<String>,
    QueryArgs(q): QueryArgs<FileQuery>,
) -> Result<Response, ApiError> {
    check_path(&q.path)?;
    let tar = tar_format(&q.format)?;
    let a = app.clone();
    let path = q.path.clone();
    let (row, st) = blocking(move || {
        let row = live_row(&a, &id)?;
        let st = stat_in(&a, &row.id, &path, true)?;
        Ok((row, st))
    })
    .await?;
    let max = app.limits.max_file;
    match (st.kind, tar) {
        (FileKind::Dir, false) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{} is a directory: ask for format=tar", q.path),
            ))
        }
        (FileKind::Dir, true) => {}
        // Not a FIFO, a device, a socket: reading one may never end.
        (FileKind::Other | FileKind::Symlink, false) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{} is not a regular file", q.path),
            ))
        }
        (_, true) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "{} is not a directory: format=tar is for directories",
                    q.path
                ),
            ))
        }
        (_, false) if st.size > max => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "{} is {} bytes; a download may be at most {max} (dough serve --max-file)",
                    q.path, st.size
                ),
            ))
        }
        _ => {}
    }
    let req = if tar {
        sh("cd -- \"$1\" && exec tar -c -f - .", &[&q.path])
    } else {
        sh("exec cat -- \"$1\"", &[&q.path])
    };
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    tokio::task::spawn_blocking(move || {
        let signaller: std::cell::OnceCell<Signaller> = Default::default();
        let mut sent = 0u64;
        let mut stopped = false;
        let mut err = Vec::new();
        let r = dough_fabric::pool::exec_with(
            &app.ctx.vms,
            &row.id,
            &req,
            dough_fabric::pool::Exec {
                stdin: None,
                started: Some(&mut |s| {
                    let _ = signaller.set(s);
                }),
            },
            &mut |s, d| {
                if stopped {
                    return;
                }
                if s == Stream::Stderr {
                    if err.len() < 4096 {
                        err.extend_from_slice(d);
                    }
                    return;
                }
                sent += d.len() as u64;
                let item = if sent > max {
                    Err(std::io::Error::other(format!(
                        "over the daemon's file limit ({max} bytes)"
                    )))
                } else {
                    Ok(Bytes::copy_from_slice(d))
                };
                let stop = item.is_err();
                if tx.blocking_send(item).is_err() || stop {
                    // Cut off, or nobody is reading: stop the guest's side.
                    stopped = true;
                    if let Some(s) = signaller.get() {
                        let _ = s.signal(9);
                    }
                }
            },
            &mut |_| {},
        );
        app.metrics
            .bytes_down
            .fetch_add(sent.min(max), Ordering::Relaxed);
        if stopped {
            return;
        }
        let fail = match r {
            Ok(ExitStatus::Exited(0)) => return,
            Ok(st) => format!(
                "reading it in the sandbox ended {st:?}: {}",
                guest_said(&err)
            ),
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        // The body ends with an error: the client sees a broken transfer,
        // not a short file.
        let _ = tx.blocking_send(Err(std::io::Error::other(fail)));
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let ctype = if tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    // No Content-Length: the size the guest reported may be out of date
    // (a growing file, /proc); the body is what it reads, up to the limit.
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, ctype)], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_answers_parse() {
        let out =
            b"directory|4096|755|1700000000\nf|3|644|1700000001.5|b|x\0d|4096|700|1700000002.0|a\0";
        let st = parse_stat("/w", out, 100).unwrap();
        assert_eq!(st.kind, FileKind::Dir);
        assert_eq!(st.mode, 0o755);
        let e = st.entries.unwrap();
        assert_eq!(
            e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "b|x"]
        );
        assert_eq!(
            (e[1].kind, e[1].size, e[1].mtime),
            (FileKind::File, 3, 1700000001)
        );
        let st = parse_stat("/f", b"regular empty file|0|600|5\n", 100).unwrap();
        assert_eq!((st.kind, st.size, st.entries), (FileKind::File, 0, None));
        let st = parse_stat("/w", out, 1).unwrap();
        assert_eq!(st.entries.unwrap().len(), 1);
    }

    proptest::proptest! {
        /// A guest says what it likes: any answer parses or is refused,
        /// never a panic.
        #[test]
        fn any_stat_answer_is_handled(out in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_stat("/x", &out, 10);
        }
    }
}
