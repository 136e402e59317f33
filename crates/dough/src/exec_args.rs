//! What to run in a VM (`ExecArgs`: command, environment, stdin, timeout)
//! and how its result reaches this process (output as it arrives, the
//! exit code).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use dough_fabric::ExecRequest;
use dough_proto::{ExitStatus, Stream};

/// What to run in a VM and how.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Kill the command after SECS seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Set an environment variable in the command (repeatable). `-e KEY`
    /// alone takes KEY's value from dough's own environment: use it (or
    /// --env-file) for secrets, since a KEY=VALUE argument is visible in
    /// `ps` to every user of this host.
    #[arg(short, long = "env", value_name = "KEY[=VALUE]", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Read variables from FILE: one KEY=VALUE per line; blank lines and
    /// lines starting with # are skipped (repeatable; -e wins over a file).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the guest (default /root).
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// Send this process's stdin to the command (read to the end first).
    #[arg(short, long)]
    pub interactive: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        Some(_) => Err(format!("expected KEY=VALUE or KEY, got {s:?}")),
        // KEY alone: the value comes from dough's environment, so it never
        // appears on a command line.
        None if !s.is_empty() => std::env::var(s)
            .map(|v| (s.to_string(), v))
            .map_err(|_| format!("-e {s}: {s} is not set in dough's environment")),
        None => Err("expected KEY=VALUE or KEY".into()),
    }
}

/// Variables from an `--env-file`: `KEY=VALUE` lines; blank lines and
/// `#` comments skipped; a malformed line is an error naming it.
fn read_env_file(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --env-file {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim_start();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        match l.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => out.push((k.trim().to_string(), v.to_string())),
            _ => anyhow::bail!(
                "--env-file {} line {}: expected KEY=VALUE",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

impl ExecArgs {
    /// What of this command may be secret, described: variables whose value
    /// is dough's own environment's (`-e KEY`), env files, stdin — the ways
    /// `dough exec` recommends for secrets. Literal `-e KEY=VALUE` is not
    /// (it is on the command line for every user of the host to see).
    pub fn may_be_secret(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .env
            .iter()
            .filter(|(k, val)| std::env::var(k).is_ok_and(|e| e == *val))
            .map(|(k, _)| format!("${k} from dough's environment"))
            .collect();
        v.extend(
            self.env_file
                .iter()
                .map(|f| format!("--env-file {}", f.display())),
        );
        if self.interactive {
            v.push("stdin".into());
        }
        v
    }

    /// The request to send, reading stdin first when asked to.
    pub fn request(&self) -> anyhow::Result<ExecRequest> {
        let stdin = if self.interactive {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            Some(buf)
        } else {
            None
        };
        let timeout = match self.timeout {
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(t) => anyhow::bail!("--timeout must be a positive number of seconds, got {t}"),
            None => None,
        };
        let mut env = Vec::new();
        for f in &self.env_file {
            env.extend(read_env_file(f)?);
        }
        // Later entries win in the guest; -e comes last.
        env.extend(self.env.iter().cloned());
        Ok(ExecRequest {
            argv: self.command.clone(),
            env,
            cwd: self.workdir.clone(),
            stdin,
            timeout,
        })
    }
}

/// Map a guest command's status to our exit code, explaining the unusual ones.
pub fn exit_code(status: &ExitStatus) -> ExitCode {
    match status {
        ExitStatus::Exited(_) => {}
        ExitStatus::Signaled(s) => eprintln!("dough: command killed by signal {s}"),
        ExitStatus::TimedOut => eprintln!("dough: command timed out and was killed"),
        ExitStatus::SpawnFailed(why) => eprintln!("dough: command could not be started: {why}"),
    }
    ExitCode::from(status.shell_code().clamp(0, 255) as u8)
}

/// Write guest output to our stdout/stderr as it arrives.
pub fn stream_sink(stream: Stream, data: &[u8]) {
    let _ = match stream {
        Stream::Stdout => std::io::stdout()
            .lock()
            .write_all(data)
            .and_then(|_| std::io::stdout().flush()),
        Stream::Stderr => std::io::stderr().lock().write_all(data),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(env: &[(&str, &str)], files: &[&str], interactive: bool) -> ExecArgs {
        ExecArgs {
            timeout: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            env_file: files.iter().map(PathBuf::from).collect(),
            workdir: None,
            interactive,
            command: vec!["true".into()],
        }
    }

    #[test]
    fn what_may_be_secret() {
        // PATH is set in any test process; its value from the environment
        // counts, a literal on the command line does not.
        let path = std::env::var("PATH").unwrap();
        let a = args(&[("PATH", &path), ("PLAIN", "visible")], &[], false);
        assert_eq!(a.may_be_secret(), vec!["$PATH from dough's environment"]);
        let a = args(&[("PATH", "/literal")], &["/tmp/x.env"], true);
        assert_eq!(a.may_be_secret(), vec!["--env-file /tmp/x.env", "stdin"]);
        assert!(args(&[], &[], false).may_be_secret().is_empty());
    }
}
