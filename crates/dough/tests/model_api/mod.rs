//! A stand-in for the Anthropic Messages API that drives the real Claude
//! Code CLI through scripted tool calls, offline.
//!
//! What it understands was recorded from the real CLI (2.1.332; trimmed in
//! `tests/fixtures/claude-2.1.332-requests.json`, which the unit test below
//! replays): `POST /v1/messages?beta=true` with the key in `x-api-key`, a
//! JSON body with `stream: true` and a `Write` tool taking `file_path`
//! (absolute) and `content`; the working directory in a text block
//! (`Primary working directory: DIR`); tool results coming back as
//! `tool_result` blocks in the last user message. Its replies are the
//! Messages API's streaming events (`message_start`, `content_block_start`
//! / `_delta` / `_stop`, `message_delta`, `message_stop`) — the real CLI
//! accepting them end to end is what the VM test checks.
//!
//! The script: for each task id (from the work order's `# Task ID: title`
//! heading), for each attempt (1 + the `## Attempt N failed` sections gobrr
//! appends), the files to write. A request with a task's work order and no
//! tool result gets one `Write` call per file; one that carries tool
//! results gets a short final answer. Every other request gets a text
//! answer. A request without the expected key gets 401.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

/// Task id → attempts → (path relative to the working directory, content).
pub type Script = BTreeMap<String, Vec<Vec<(String, String)>>>;

/// One request the stand-in answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// The `x-api-key` it carried was the expected one.
    pub key_ok: bool,
    pub task: Option<String>,
    pub attempt: usize,
    /// Tool results it carried back.
    pub tool_results: usize,
    /// What the stand-in answered: `write:N`, `done`, `text`, `401`, `404`.
    pub answer: String,
}

#[derive(Debug, Clone)]
pub struct ModelApi {
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// What a request asks, as far as the stand-in cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub task: Option<String>,
    pub attempt: usize,
    pub cwd: Option<String>,
    pub tool_results: usize,
    pub stream: bool,
    pub model: String,
}

fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Read a Messages API request body.
pub fn parse(body: &Value) -> Asked {
    let mut texts = Vec::new();
    strings(&body["messages"], &mut texts);
    strings(&body["system"], &mut texts);
    let mut task = None;
    let mut attempt = 1;
    let mut cwd = None;
    for t in &texts {
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# Task ") {
                if let Some((id, _)) = rest.split_once(':') {
                    task.get_or_insert_with(|| id.trim().to_string());
                }
            }
            if line.starts_with("## Attempt ") && line.ends_with(" failed") {
                attempt += 1;
            }
            if let Some((_, dir)) = line.split_once("Primary working directory: ") {
                cwd.get_or_insert_with(|| dir.trim().to_string());
            }
        }
    }
    let last = body["messages"].as_array().and_then(|m| m.last());
    let tool_results = last
        .and_then(|m| m["content"].as_array())
        .map(|c| c.iter().filter(|b| b["type"] == "tool_result").count())
        .unwrap_or(0);
    Asked {
        task,
        attempt,
        cwd,
        tool_results,
        stream: body["stream"].as_bool().unwrap_or(false),
        model: body["model"].as_str().unwrap_or("model").to_string(),
    }
}

/// The reply's content blocks and stop reason for what was asked.
pub fn answer(asked: &Asked, script: &Script) -> (Vec<Value>, &'static str, String) {
    let text = |t: &str| vec![json!({"type": "text", "text": t})];
    if asked.tool_results > 0 {
        return (
            text("Done: the files are written."),
            "end_turn",
            "done".into(),
        );
    }
    let files = asked
        .task
        .as_ref()
        .and_then(|t| script.get(t))
        .and_then(|attempts| attempts.get(asked.attempt - 1).or(attempts.last()));
    match (files, &asked.cwd) {
        (Some(files), Some(cwd)) if !files.is_empty() => {
            let calls = files
                .iter()
                .enumerate()
                .map(|(i, (path, content))| {
                    json!({
                        "type": "tool_use",
                        "id": format!("toolu_standin_{}_{}_{i}", asked.attempt, path.replace('/', "_")),
                        "name": "Write",
                        "input": {"file_path": format!("{cwd}/{path}"), "content": content},
                    })
                })
                .collect();
            (calls, "tool_use", format!("write:{}", files.len()))
        }
        _ => (text("OK."), "end_turn", "text".into()),
    }
}

fn sse(event: &str, data: Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// The reply as the streaming events the API sends.
pub fn stream_body(id: &str, model: &str, blocks: &[Value], stop: &str) -> String {
    let mut out = sse(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 1}}}),
    );
    for (i, b) in blocks.iter().enumerate() {
        if b["type"] == "tool_use" {
            let start = json!({"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}});
            out += &sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": i, "content_block": start}),
            );
            out += &sse(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i,
                       "delta": {"type": "input_json_delta", "partial_json": b["input"].to_string()}}),
            );
        } else {
            out += &sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": i,
                       "content_block": {"type": "text", "text": ""}}),
            );
            out += &sse(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i,
                       "delta": {"type": "text_delta", "text": b["text"]}}),
            );
        }
        out += &sse(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        );
    }
    out += &sse(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
               "usage": {"output_tokens": 20}}),
    );
    out += &sse("message_stop", json!({"type": "message_stop"}));
    out
}

/// The whole answer to one request (status, content type, body) and what
/// to record of it.
pub fn respond(
    post: bool,
    path: &str,
    key_ok: bool,
    body: &[u8],
    script: &Script,
    n: usize,
) -> (StatusCode, &'static str, String, Seen) {
    let seen = |asked: Option<&Asked>, answer: &str| Seen {
        path: path.to_string(),
        key_ok,
        task: asked.and_then(|a| a.task.clone()),
        attempt: asked.map(|a| a.attempt).unwrap_or(0),
        tool_results: asked.map(|a| a.tool_results).unwrap_or(0),
        answer: answer.to_string(),
    };
    let error = |status: StatusCode, kind: &str, message: &str, what: &str| {
        let body = json!({"type": "error", "error": {"type": kind, "message": message}});
        (
            status,
            "application/json",
            body.to_string(),
            seen(None, what),
        )
    };
    if !(post && path.starts_with("/v1/messages")) {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "no such endpoint",
            "404",
        );
    }
    if !key_ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
            "401",
        );
    }
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
            "400",
        );
    };
    let asked = parse(&json);
    let (blocks, stop, what) = answer(&asked, script);
    let id = format!("msg_standin_{n}");
    let rec = seen(Some(&asked), &what);
    if asked.stream {
        let body = stream_body(&id, &asked.model, &blocks, stop);
        return (StatusCode::OK, "text/event-stream", body, rec);
    }
    let msg = json!({"id": id, "type": "message", "role": "assistant",
        "model": asked.model, "content": blocks, "stop_reason": stop,
        "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 20}});
    (StatusCode::OK, "application/json", msg.to_string(), rec)
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    key: Arc<String>,
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().to_string();
    let key_ok = req
        .headers()
        .get("x-api-key")
        .is_some_and(|k| k.as_bytes() == key.as_bytes());
    let post = req.method() == hyper::Method::POST;
    let body = Limited::new(req.into_body(), 16 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let n = seen.lock().unwrap().len();
    let (status, ctype, body, rec) = respond(post, &path, key_ok, &body, &script, n);
    seen.lock().unwrap().push(rec);
    Ok(Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response"))
}

/// Serve HTTPS on `listener` (already bound, e.g. in a test world's
/// namespace) with `tls`, expecting `key`, following `script`.
pub fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    key: &str,
    script: Script,
) -> ModelApi {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api = ModelApi { seen: seen.clone() };
    let key = Arc::new(key.to_string());
    let script = Arc::new(script);
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (acceptor, key, script, seen) =
                    (acceptor.clone(), key.clone(), script.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, key.clone(), script.clone(), seen.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
    });
    api
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Vec<Value> {
        let doc: Value =
            serde_json::from_str(include_str!("../fixtures/claude-2.1.332-requests.json")).unwrap();
        doc["requests"].as_array().unwrap().clone()
    }

    /// The recorded requests of the real CLI parse as the stand-in expects:
    /// the working directory, the tool result, the Write tool's arguments.
    #[test]
    fn the_real_clis_recorded_requests_parse() {
        let r = recorded();
        assert_eq!(r[0]["method"], "POST");
        assert!(r[0]["path"].as_str().unwrap().starts_with("/v1/messages"));
        let first = parse(&r[0]["body"]);
        assert_eq!(first.cwd.as_deref(), Some("/tmp/rec/w"));
        assert_eq!((first.tool_results, first.stream), (0, true));
        let write = r[0]["body"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "Write")
            .unwrap();
        let props = &write["input_schema"]["properties"];
        assert!(props["file_path"].is_object() && props["content"].is_object());
        assert_eq!(
            write["input_schema"]["required"],
            json!(["file_path", "content"])
        );
        let second = parse(&r[1]["body"]);
        assert_eq!(second.tool_results, 1);
        // What the stand-in answered the real CLI with is what it answers.
        let call = &r[1]["body"]["messages"][2]["content"][0];
        assert_eq!(call["type"], "tool_use");
        assert_eq!(call["name"], "Write");
    }

    #[test]
    fn without_the_key_or_off_the_api_nothing_is_answered() {
        let body = br#"{"stream": true, "messages": []}"#;
        let script = Script::new();
        let (status, _, text, seen) = respond(true, "/v1/messages", false, body, &script, 0);
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(text.contains("authentication_error"), "{text}");
        assert!(!seen.key_ok);
        let (status, ..) = respond(false, "/v1/messages", true, body, &script, 0);
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, ..) = respond(true, "/v1/other", true, body, &script, 0);
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, ..) = respond(true, "/v1/messages", true, b"{nope", &script, 0);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, ctype, _, seen) = respond(true, "/v1/messages", true, body, &script, 0);
        assert_eq!((status, ctype), (StatusCode::OK, "text/event-stream"));
        assert_eq!(seen.answer, "text");
    }

    #[test]
    fn a_work_order_gets_its_attempts_files_then_a_final_answer() {
        let mut script = Script::new();
        script.insert(
            "lines".into(),
            vec![
                vec![("a.py".into(), "bad".into())],
                vec![("a.py".into(), "good".into()), ("b.py".into(), "x".into())],
            ],
        );
        let order = |extra: &str| {
            json!({"stream": true, "model": "m", "messages": [
                {"role": "user", "content": [{"type": "text",
                  "text": format!("# Task lines: Count lines\n\nwork\n{extra}")}]},
                {"role": "system", "content": "# Environment\n - Primary working directory: /w\n"}
            ]})
        };
        let a1 = parse(&order(""));
        assert_eq!((a1.task.as_deref(), a1.attempt), (Some("lines"), 1));
        let (blocks, stop, _) = answer(&a1, &script);
        assert_eq!(stop, "tool_use");
        assert_eq!(blocks[0]["input"]["file_path"], "/w/a.py");
        assert_eq!(blocks[0]["input"]["content"], "bad");
        let a2 = parse(&order("\n## Attempt 1 failed\n\ntests failed\n"));
        assert_eq!(a2.attempt, 2);
        let (blocks, _, what) = answer(&a2, &script);
        assert_eq!((blocks.len(), what.as_str()), (2, "write:2"));
        let done = Asked {
            tool_results: 2,
            ..a2
        };
        assert_eq!(answer(&done, &script).1, "end_turn");
        let body = stream_body("m1", "model", &blocks, "tool_use");
        let events: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(events.first(), Some(&"message_start"));
        assert_eq!(events.last(), Some(&"message_stop"));
        for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
            serde_json::from_str::<Value>(line).expect("every event is JSON");
        }
    }
}
