//! `--secret` and `--inject`: secrets for one command, and which of them
//! the guest only ever sees a placeholder of (the clone's gateway puts the
//! real value into requests to the hosts named, and nowhere else).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use dough_gateway::broker::{Broker, HeaderRule};
use dough_net::{Egress, NamePattern};

#[derive(Debug, Args)]
pub struct SecretArgs {
    /// A secret for the command, as environment variable NAME: its value
    /// from dough's environment (`env:VAR`) or a file (`file:PATH`), never
    /// from the command line (repeatable). Without --inject the guest gets
    /// the real value.
    #[arg(long = "secret", value_name = "NAME=env:VAR|file:PATH")]
    pub secrets: Vec<String>,
    /// Broker secret NAME: the guest gets a random placeholder (with the
    /// real value's prefix, e.g. `sk-ant-api03-`), and the clone's gateway
    /// puts the real value in place of it only in HEADER (default
    /// `authorization`; `x-api-key`, `authorization: Basic` for git) of
    /// HTTPS requests to HOSTS (exact names or `*.domain`, comma
    /// separated), which --net must allow (repeatable).
    ///
    /// Example: --secret ANTHROPIC_API_KEY=env:ANTHROPIC_API_KEY --inject ANTHROPIC_API_KEY@api.anthropic.com:x-api-key
    #[arg(long = "inject", value_name = "NAME@HOST[,HOST...][:HEADER]")]
    pub inject: Vec<String>,
}

/// What the command and the clone get.
#[derive(Debug, Default)]
pub struct Secrets {
    /// For the command's environment (placeholders for brokered ones).
    pub env: Vec<(String, String)>,
    /// For the clone's gateway.
    pub brokers: Vec<Broker>,
}

/// One `--inject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inject {
    pub name: String,
    pub hosts: Vec<NamePattern>,
    pub header: HeaderRule,
}

pub fn parse_inject(s: &str) -> anyhow::Result<Inject> {
    let (name, rest) = s
        .split_once('@')
        .with_context(|| format!("--inject {s}: expected NAME@HOST[,HOST...][:HEADER]"))?;
    let (hosts, header) = match rest.split_once(':') {
        Some((h, hd)) => (
            h,
            hd.parse()
                .map_err(|e| anyhow::anyhow!("--inject {s}: {e}"))?,
        ),
        None => (rest, HeaderRule::default()),
    };
    let hosts = hosts
        .split(',')
        .map(|h| h.parse::<NamePattern>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--inject {s}: {e}"))?;
    anyhow::ensure!(!hosts.is_empty(), "--inject {s}: no host");
    Ok(Inject {
        name: name.to_string(),
        hosts,
        header,
    })
}

/// The prefix a placeholder keeps: the real value up to its last `-` or
/// `_` among the first 16 characters (`sk-ant-api03-`, `ghp_`), if any.
pub fn visible_prefix(value: &str) -> &str {
    let head: String = value.chars().take(16).collect();
    match head.rfind(['-', '_']) {
        Some(i) => &value[..=i],
        None => "",
    }
}

impl SecretArgs {
    /// Every `--inject`, parsed.
    pub fn injects(&self) -> anyhow::Result<Vec<Inject>> {
        self.inject.iter().map(|s| parse_inject(s)).collect()
    }

    /// Read every secret, build the brokers, and check each brokered host
    /// is one `egress` lets through.
    pub fn resolve(&self, egress: &Egress) -> anyhow::Result<Secrets> {
        let values = self.values()?;
        self.brokered(values, egress)
    }

    /// Every `--secret`'s (name, value).
    pub fn values(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut values = Vec::new();
        for s in &self.secrets {
            let (name, source) = s.split_once('=').with_context(|| {
                format!("--secret {s}: expected NAME=env:VAR or NAME=file:PATH")
            })?;
            anyhow::ensure!(
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "--secret {s}: {name:?} is not an environment variable name"
            );
            let value = if let Some(var) = source.strip_prefix("env:") {
                std::env::var(var).with_context(|| {
                    format!("--secret {name}: {var} is not set in dough's environment")
                })?
            } else if let Some(path) = source.strip_prefix("file:") {
                let p = PathBuf::from(path);
                std::fs::read_to_string(&p)
                    .with_context(|| format!("--secret {name}: reading {}", p.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string()
            } else {
                anyhow::bail!("--secret {s}: the value must come from env:VAR or file:PATH (never the command line)")
            };
            anyhow::ensure!(!value.is_empty(), "--secret {name} is empty");
            values.push((name.to_string(), value));
        }
        Ok(values)
    }

    fn brokered(&self, values: Vec<(String, String)>, egress: &Egress) -> anyhow::Result<Secrets> {
        let mut out = Secrets::default();
        let injects = self.injects()?;
        for i in &injects {
            anyhow::ensure!(
                values.iter().any(|(n, _)| n == &i.name),
                "--inject {}: no --secret {} to broker",
                i.name,
                i.name
            );
            for h in &i.hosts {
                anyhow::ensure!(
                    egress.reaches(h, 443),
                    "--inject {}: --net {egress} does not let clones reach {h} on port 443 (add it to allow=)",
                    i.name
                );
            }
        }
        for (name, value) in values {
            match injects.iter().find(|i| i.name == name) {
                Some(i) => {
                    let mut random = [0u8; 64];
                    dough_fabric::fill_random(&mut random);
                    let placeholder = dough_gateway::broker::placeholder(
                        visible_prefix(&value),
                        value.len(),
                        &random,
                    );
                    out.env.push((name.clone(), placeholder.clone()));
                    out.brokers.push(Broker {
                        name,
                        placeholder,
                        value,
                        hosts: i.hosts.clone(),
                        header: i.header.clone(),
                    });
                }
                None => out.env.push((name, value)),
            }
        }
        Ok(out)
    }
}

/// dough's CA for brokered secrets, under `$DOUGH_HOME/ca` (made on first
/// use; its key never leaves this host).
pub fn dough_ca(home: &std::path::Path) -> anyhow::Result<dough_gateway::tls::CaPem> {
    dough_gateway::tls::CaPem::load_or_create(&home.join("ca"))
        .with_context(|| format!("dough's CA under {}", home.join("ca").display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injects_parse() {
        let i = parse_inject("KEY@api.example.com,*.example.org:x-api-key").unwrap();
        assert_eq!(i.name, "KEY");
        assert_eq!(i.hosts.len(), 2);
        assert_eq!(i.header.name, "x-api-key");
        assert_eq!(
            parse_inject("K@git.example.com:authorization: Basic")
                .unwrap()
                .header
                .to_string(),
            "authorization: Basic"
        );
        assert_eq!(
            parse_inject("K@h.example.com").unwrap().header.name,
            "authorization"
        );
        for bad in ["K", "K@", "K@*.com", "K@a.example.com:bad header"] {
            assert!(parse_inject(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_and_policies() {
        assert_eq!(visible_prefix("sk-ant-api03-abcdefghijkl"), "sk-ant-api03-");
        assert_eq!(visible_prefix("ghp_abcdefghijklmnop"), "ghp_");
        assert_eq!(visible_prefix("abcdefghijklmnopqrstu-v"), "");
        let host: NamePattern = "api.example.com".parse().unwrap();
        let reaches = |e: &str, h: &NamePattern| e.parse::<Egress>().unwrap().reaches(h, 443);
        assert!(reaches("nat", &host));
        assert!(!reaches("none", &host));
        assert!(reaches("allow=api.example.com", &host));
        assert!(reaches("allow=*.example.com", &host));
        assert!(!reaches("allow=api.example.com:80", &host));
        assert!(!reaches("allow=10.0.0.0/8", &host));
        let wild: NamePattern = "*.api.example.com".parse().unwrap();
        assert!(reaches("allow=*.example.com", &wild));
        assert!(reaches("allow=*.api.example.com", &wild));
        assert!(!reaches("allow=api.example.com", &wild));
    }
}
