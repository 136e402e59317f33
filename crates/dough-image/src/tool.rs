//! Running the external programs the pipeline needs, with errors that carry
//! the program's own complaint.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{program} is not installed (install it with apt-get, or run `dough doctor`)")]
    Missing { program: String },
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr_tail}")]
    Failed {
        program: String,
        status: String,
        stderr_tail: String,
    },
}

/// Last `n` lines of `text`, for error messages.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run `program args...` in the current directory and return its stdout.
pub fn run_tool(program: &str, args: Vec<OsString>) -> Result<String, ToolError> {
    run(Command::new(program).args(&args), program)
}

/// Run `program args...` in `dir` and return its stdout.
pub fn run_tool_in(program: &str, args: Vec<OsString>, dir: &Path) -> Result<String, ToolError> {
    run(Command::new(program).args(&args).current_dir(dir), program)
}

fn run(cmd: &mut Command, program: &str) -> Result<String, ToolError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ToolError::Missing {
                program: program.to_string(),
            }
        } else {
            ToolError::Spawn {
                program: program.to_string(),
                source,
            }
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        return Err(ToolError::Failed {
            program: program.to_string(),
            status: out.status.to_string(),
            stderr_tail: tail_lines(&text, 15),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_is_named() {
        let e = run_tool("dough-no-such-program", vec![]).unwrap_err();
        assert!(matches!(e, ToolError::Missing { .. }), "{e}");
    }

    #[test]
    fn failure_carries_stderr_tail() {
        let e = run_tool(
            "sh",
            vec!["-c".into(), "echo one >&2; echo two >&2; exit 3".into()],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("two") && msg.contains("exit status: 3"),
            "{msg}"
        );
    }
}
