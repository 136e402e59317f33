//! Image recipes: a TOML file that turns a base image into an agent's image.
//!
//! ```toml
//! name = "claude"                      # label for `dough image ls` (default: file stem)
//! ca = "host"                          # or ["corp-ca.pem"]: trusted in the build and the image
//! run = ["npm install -g @anthropic-ai/claude-code@2.1.332", "claude --version"]
//!
//! [base]
//! suite = "bookworm"
//! packages = ["nodejs", "npm"]         # Debian packages on top of dough's base set
//!
//! [env]                                # for the run steps and every command in the image
//! IS_SANDBOX = "1"
//!
//! [[files]]                            # copied in before the run steps
//! src = "settings.json"                # relative to the recipe file
//! dest = "/root/.claude/settings.json"
//! mode = "0600"
//!
//! [guest]                              # how its clones boot
//! mem_mib = 1024                       # unless --mem says otherwise
//!
//! [build]                              # the builder VM
//! mem_mib = 2048
//! size_gib = 4                         # the image's root filesystem (sparse)
//! egress = "nat"
//! step_timeout_secs = 1800
//! ```
//!
//! This module only reads and checks a recipe and computes its key; the run
//! steps execute inside a builder VM (dough-fabric's `builder`), never here.
//! An image made from a recipe is keyed by (its base image, the recipe's
//! content, the content of every file and certificate it names): an
//! unchanged recipe is a cache hit, a changed one rebuilds only itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::KeyBuilder;

/// Bumped when what a builder does with a recipe changes.
pub const RECIPE_BUILDER: &str = "recipe-v1";

/// Where Debian keeps the host's CA bundle (`ca = "host"`).
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Limits on what a recipe may bring in from the host.
pub const MAX_RECIPE_BYTES: u64 = 1 << 20;
pub const MAX_FILE_BYTES: u64 = 64 << 20;
pub const MAX_FILES_TOTAL: u64 = 256 << 20;
pub const MAX_CA_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("reading recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("recipe {path}: {problems}")]
    Invalid { path: PathBuf, problems: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default, skip_serializing)]
    pub name: Option<String>,
    #[serde(default)]
    pub base: Base,
    #[serde(default)]
    pub ca: Option<CaSpec>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub run: Vec<String>,
    #[serde(default)]
    pub build: BuildSettings,
    /// How the image's clones boot (not part of the image's key: changing
    /// it rebuilds nothing).
    #[serde(default)]
    pub guest: GuestSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSettings {
    /// Memory its clones get unless a command says otherwise (`--mem`).
    pub mem_mib: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    #[serde(default = "default_suite")]
    pub suite: String,
    #[serde(default)]
    pub packages: Vec<String>,
}

impl Default for Base {
    fn default() -> Self {
        Base {
            suite: default_suite(),
            packages: Vec::new(),
        }
    }
}

fn default_suite() -> String {
    "bookworm".into()
}

/// `ca = "host"` or `ca = ["a.pem", ...]` (one file: `ca = "a.pem"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CaSpec {
    One(String),
    Many(Vec<String>),
}

impl CaSpec {
    fn sources(&self) -> Vec<&str> {
        match self {
            CaSpec::One(s) => vec![s.as_str()],
            CaSpec::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub src: PathBuf,
    pub dest: String,
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "0644".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSettings {
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
    #[serde(default = "default_size")]
    pub size_gib: u32,
    #[serde(default = "default_egress")]
    pub egress: String,
    #[serde(default = "default_step_timeout")]
    pub step_timeout_secs: u64,
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            mem_mib: default_mem(),
            size_gib: default_size(),
            egress: default_egress(),
            step_timeout_secs: default_step_timeout(),
        }
    }
}

fn default_mem() -> u32 {
    2048
}
fn default_size() -> u32 {
    4
}
fn default_egress() -> String {
    "nat".into()
}
fn default_step_timeout() -> u64 {
    1800
}

/// A file the builder copies into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIn {
    pub dest: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// A recipe read from disk with everything it names from the host (files,
/// certificates) read too, bounded, so its key covers their content.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub path: PathBuf,
    pub name: String,
    pub recipe: Recipe,
    pub files: Vec<FileIn>,
    /// PEM certificates the build and the image trust (empty: none).
    pub ca_pem: String,
}

impl LoadedRecipe {
    /// Read and check the recipe at `path`. `host_bundle` is where
    /// `ca = "host"` reads from (normally [`HOST_CA_BUNDLE`]).
    pub fn load(path: &Path, host_bundle: &Path) -> Result<LoadedRecipe, RecipeError> {
        let text = read_bounded(path, MAX_RECIPE_BYTES).map_err(|source| RecipeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(text).map_err(|_| RecipeError::Parse {
            path: path.to_path_buf(),
            message: "not UTF-8".into(),
        })?;
        let recipe: Recipe = toml::from_str(&text).map_err(|e| RecipeError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut problems = recipe.problems();
        let mut files = Vec::new();
        let mut total = 0u64;
        for f in &recipe.files {
            let src = dir.join(&f.src);
            match read_bounded(&src, MAX_FILE_BYTES) {
                Ok(data) => {
                    total += data.len() as u64;
                    files.push(FileIn {
                        dest: f.dest.clone(),
                        mode: parse_mode(&f.mode).unwrap_or(0o644),
                        data,
                    });
                }
                Err(e) => problems.push(format!("file {}: {e}", src.display())),
            }
        }
        if total > MAX_FILES_TOTAL {
            problems.push(format!(
                "files add up to {total} bytes; at most {MAX_FILES_TOTAL}"
            ));
        }
        let mut ca_pem = String::new();
        for c in recipe.ca.iter().flat_map(CaSpec::sources) {
            let src = match c {
                "host" => host_bundle.to_path_buf(),
                other => dir.join(other),
            };
            match read_bounded(&src, MAX_CA_BYTES).map(String::from_utf8) {
                Ok(Ok(pem)) if pem.contains("-----BEGIN CERTIFICATE-----") => {
                    ca_pem.push_str(pem.trim_end());
                    ca_pem.push('\n');
                }
                Ok(_) => problems.push(format!(
                    "ca {}: not a PEM certificate bundle",
                    src.display()
                )),
                Err(e) => problems.push(format!("ca {}: {e}", src.display())),
            }
        }
        if !problems.is_empty() {
            return Err(RecipeError::Invalid {
                path: path.to_path_buf(),
                problems: problems.join("; "),
            });
        }
        let name = recipe.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("recipe")
                .to_string()
        });
        Ok(LoadedRecipe {
            path: path.to_path_buf(),
            name,
            recipe,
            files,
            ca_pem,
        })
    }

    /// The recipe's key on top of the base root filesystem `base_rootfs`
    /// (its key: the kernel and the agent do not shape what the steps
    /// make, so changing them rebuilds no recipe): its content (not its
    /// name or where it lives), the files' and certificates' content, and
    /// the builder's own version.
    pub fn key(&self, base_rootfs: &str) -> String {
        let recipe = Recipe {
            guest: GuestSettings::default(),
            ..self.recipe.clone()
        };
        let canonical = serde_json::to_string(&recipe).expect("a recipe serializes");
        let mut k = KeyBuilder::new(RECIPE_BUILDER);
        k.str("base", base_rootfs).str("recipe", &canonical);
        for f in &self.files {
            k.str("dest", &f.dest)
                .str("mode", &format!("{:o}", f.mode))
                .part("data", &f.data);
        }
        k.str("ca", &self.ca_pem);
        k.finish()
    }

    /// The environment the run steps and the image's commands get.
    pub fn env(&self) -> Vec<(String, String)> {
        self.recipe
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Recipe {
    /// Everything wrong with the recipe itself, each a sentence.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(n) = &self.name {
            if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_graphic()) {
                p.push(format!(
                    "name {n:?} must be 1-64 printable ASCII characters"
                ));
            }
        }
        if !valid_word(&self.base.suite, |c| c.is_ascii_lowercase() || c == '-') {
            p.push(format!(
                "base.suite {:?} is not a suite name",
                self.base.suite
            ));
        }
        for pkg in &self.base.packages {
            let ok = pkg.len() >= 2
                && pkg.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && valid_word(pkg, |c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c)
                });
            if !ok {
                p.push(format!(
                    "base.packages: {pkg:?} is not a Debian package name"
                ));
            }
        }
        for (k, v) in &self.env {
            let ok = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && valid_word(k, |c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                p.push(format!("env: {k:?} is not a variable name"));
            }
            if v.contains('\0') {
                p.push(format!("env {k}: the value contains a NUL byte"));
            }
        }
        for f in &self.files {
            if let Some(why) = bad_dest(&f.dest) {
                p.push(format!("files: dest {:?} {why}", f.dest));
            }
            if parse_mode(&f.mode).is_none() {
                p.push(format!(
                    "files {}: mode {:?} is not an octal mode like \"0644\"",
                    f.dest, f.mode
                ));
            }
            if f.src.is_absolute() || f.src.components().any(|c| c.as_os_str() == "..") {
                p.push(format!(
                    "files: src {} must be a path inside the recipe's directory",
                    f.src.display()
                ));
            }
        }
        if let Some(ca) = &self.ca {
            let srcs = ca.sources();
            if srcs.is_empty() {
                p.push("ca: an empty list; leave it out to trust nothing extra".into());
            }
            for s in srcs {
                if s != "host" && (Path::new(s).is_absolute() || s.contains("..")) {
                    p.push(format!(
                        "ca: {s:?} must be \"host\" or a file inside the recipe's directory"
                    ));
                }
            }
        }
        for (i, step) in self.run.iter().enumerate() {
            if step.trim().is_empty() || step.contains('\0') {
                p.push(format!("run step {}: empty or contains a NUL byte", i + 1));
            }
        }
        if let Some(m) = self.guest.mem_mib {
            if !(128..=65536).contains(&m) {
                p.push(format!("guest.mem_mib {m} is not in 128..=65536"));
            }
        }
        let b = &self.build;
        if !(256..=65536).contains(&b.mem_mib) {
            p.push(format!("build.mem_mib {} is not in 256..=65536", b.mem_mib));
        }
        if !(1..=1024).contains(&b.size_gib) {
            p.push(format!("build.size_gib {} is not in 1..=1024", b.size_gib));
        }
        if !(1..=86_400).contains(&b.step_timeout_secs) {
            p.push(format!(
                "build.step_timeout_secs {} is not in 1..=86400",
                b.step_timeout_secs
            ));
        }
        p
    }
}

fn valid_word(s: &str, ok: impl Fn(char) -> bool) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(ok)
}

/// An octal file mode, at most 0o7777.
pub fn parse_mode(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 5 {
        return None;
    }
    u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o7777)
}

/// Why `dest` is not a plain absolute path in the guest, if it is not.
fn bad_dest(dest: &str) -> Option<&'static str> {
    if !dest.starts_with('/') || dest == "/" {
        return Some("must be an absolute path to a file");
    }
    if dest.len() > 4096 || dest.contains('\0') || dest.contains('\n') {
        return Some("is too long or contains a NUL or newline");
    }
    if dest.ends_with('/') || dest.split('/').any(|c| c == ".." || c == ".") {
        return Some("must not contain `.` or `..` or end with `/`");
    }
    None
}

/// Read a file, refusing one larger than `limit` before reading it.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > limit {
        return Err(std::io::Error::other(format!(
            "{len} bytes; at most {limit}"
        )));
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::other(format!("more than {limit} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn a_full_recipe_loads_with_its_files_and_defaults() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "hello.txt", "hi\n");
        write(d.path(), "corp.pem", PEM);
        let p = write(
            d.path(),
            "agent.toml",
            r#"
            ca = ["corp.pem"]
            run = ["echo one", "echo two"]
            [base]
            packages = ["nodejs", "g++"]
            [env]
            IS_SANDBOX = "1"
            [[files]]
            src = "hello.txt"
            dest = "/etc/hello"
            mode = "0600"
            "#,
        );
        let r = LoadedRecipe::load(&p, Path::new("/nonexistent")).unwrap();
        assert_eq!(r.name, "agent");
        assert_eq!(r.recipe.base.suite, "bookworm");
        assert_eq!(r.recipe.build, BuildSettings::default());
        assert_eq!(
            r.files,
            vec![FileIn {
                dest: "/etc/hello".into(),
                mode: 0o600,
                data: b"hi\n".to_vec()
            }]
        );
        assert_eq!(r.ca_pem, PEM);
        assert_eq!(r.env(), vec![("IS_SANDBOX".into(), "1".into())]);
    }

    #[test]
    fn ca_host_reads_the_given_bundle() {
        let d = tempfile::tempdir().unwrap();
        let bundle = write(d.path(), "bundle.crt", PEM);
        let p = write(d.path(), "r.toml", "ca = \"host\"\n");
        let r = LoadedRecipe::load(&p, &bundle).unwrap();
        assert_eq!(r.ca_pem, PEM);
        let missing = LoadedRecipe::load(&p, &d.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("ca "), "{missing}");
    }

    #[test]
    fn the_key_follows_content_not_name_or_place() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "f", "one");
        let a = write(
            d.path(),
            "a.toml",
            "name = \"a\"\nrun = [\"true\"]\n[[files]]\nsrc = \"f\"\ndest = \"/f\"\n",
        );
        let b = write(
            d.path(),
            "b.toml",
            "name = \"b\"\nrun = [\"true\"]\n[[files]]\nsrc = \"f\"\ndest = \"/f\"\n",
        );
        let none = Path::new("/nonexistent");
        let ka = LoadedRecipe::load(&a, none).unwrap().key("base1");
        assert_eq!(ka, LoadedRecipe::load(&b, none).unwrap().key("base1"));
        assert_ne!(ka, LoadedRecipe::load(&a, none).unwrap().key("base2"));
        write(d.path(), "f", "two");
        assert_ne!(ka, LoadedRecipe::load(&a, none).unwrap().key("base1"));
        let mem = write(
            d.path(),
            "mem.toml",
            "name = \"a\"\nrun = [\"true\"]\n[[files]]\nsrc = \"f\"\ndest = \"/f\"\n[guest]\nmem_mib = 1024\n",
        );
        assert_eq!(
            LoadedRecipe::load(&a, none).unwrap().key("base1"),
            LoadedRecipe::load(&mem, none).unwrap().key("base1"),
            "how clones boot is not part of the image"
        );
        let c = write(
            d.path(),
            "c.toml",
            "run = [\"false\"]\n[[files]]\nsrc = \"f\"\ndest = \"/f\"\n",
        );
        assert_ne!(
            LoadedRecipe::load(&a, none).unwrap().key("base1"),
            LoadedRecipe::load(&c, none).unwrap().key("base1")
        );
    }

    #[test]
    fn every_problem_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "bad.toml",
            r#"
            ca = "/etc/passwd"
            run = ["", "ok"]
            [base]
            suite = "Book Worm"
            packages = ["rm -rf /"]
            [env]
            "1BAD" = "x"
            [[files]]
            src = "../outside"
            dest = "relative/path"
            mode = "999"
            [build]
            mem_mib = 1
            size_gib = 0
            "#,
        );
        let e = LoadedRecipe::load(&p, Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        for want in [
            "ca: \"/etc/passwd\"",
            "run step 1",
            "base.suite",
            "not a Debian package name",
            "not a variable name",
            "src ../outside",
            "must be an absolute path",
            "not an octal mode",
            "build.mem_mib",
            "build.size_gib",
        ] {
            assert!(e.contains(want), "{want:?} missing from: {e}");
        }
        let unknown = write(d.path(), "u.toml", "runn = [\"x\"]\n");
        let e = LoadedRecipe::load(&unknown, Path::new("/x")).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn oversized_inputs_are_refused_before_reading() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let p = write(
            d.path(),
            "r.toml",
            "[[files]]\nsrc = \"big\"\ndest = \"/big\"\n",
        );
        let e = LoadedRecipe::load(&p, Path::new("/x")).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        /// Whatever a recipe file holds, loading it answers (a recipe or a
        /// named problem) and never panics; what loads has no problems.
        #[test]
        fn any_recipe_text_loads_or_is_refused(
            text in proptest::prop_oneof![
                "\\PC{0,200}",
                proptest::collection::vec(proptest::prop_oneof![
                    proptest::strategy::Just("run = [\"x\"]\n".to_string()),
                    proptest::strategy::Just("[build]\nsize_gib = 4\n".to_string()),
                    proptest::strategy::Just("[env]\nA = \"b\"\n".to_string()),
                    proptest::strategy::Just("ca = \"host\"\n".to_string()),
                    proptest::strategy::Just("[[files]]\nsrc = \"f\"\ndest = \"/f\"\n".to_string()),
                    "[a-z_\\[\\]=\" ./0-9\n]{0,40}",
                ], 0..6).prop_map(|v| v.concat()),
            ]
        ) {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("f"), "data").unwrap();
            let p = d.path().join("r.toml");
            std::fs::write(&p, &text).unwrap();
            if let Ok(r) = LoadedRecipe::load(&p, Path::new("/nonexistent")) {
                proptest::prop_assert!(r.recipe.problems().is_empty());
                let _ = r.key("base");
            }
        }

        #[test]
        fn dest_checks_never_accept_a_dot_dot_or_relative(s in "[a-z./]{0,12}") {
            if bad_dest(&s).is_none() {
                proptest::prop_assert!(s.starts_with('/'));
                proptest::prop_assert!(!s.split('/').any(|c| c == ".." || c == "."));
            }
        }

        #[test]
        fn modes_parse_only_octal_up_to_7777(s in "[0-9a-z]{0,6}") {
            if let Some(m) = parse_mode(&s) {
                proptest::prop_assert!(m <= 0o7777);
                let back = format!("{m:o}");
                proptest::prop_assert_eq!(back.trim_start_matches('0'), s.trim_start_matches('0'));
            }
        }
    }
}
