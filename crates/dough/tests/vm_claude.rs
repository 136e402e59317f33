//! VM tier: the example plan (examples/claude) run end to end by the real
//! Claude Code CLI in real clones, offline. The agents' image is built from
//! the example's recipe (npm, through this host's TLS-intercepting proxy
//! where there is one; built once and cached in the shared test home). The
//! model API is a stand-in (tests/model_api) in a test world under the real
//! name `api.anthropic.com`, which the clones' gateways resolve from their
//! test table: the plan runs unmodified. The key is brokered: the guests
//! hold a placeholder, and the stand-in answers only the real key.
#![cfg(feature = "test-hooks")]

mod common;
mod https;
mod model_api;

use std::path::{Path, PathBuf};

use common::*;
use dough_net::testing::World;

const REAL_KEY: &str = "sk-ant-api03-REALclaudeKEY0123456789abcdefREALclaudeKEY0123456789ab";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/claude")
}

/// The example recipe's image, built in (and cached by) the shared home;
/// a private home made after this sees it like every other image.
fn claude_image() -> String {
    let recipe = example().join("recipe.toml");
    let built = run(
        &shared_home(),
        &["image", "build", "--recipe", recipe.to_str().unwrap()],
    );
    assert!(
        built.status.success(),
        "building the example's image: {}",
        text(&built.stderr)
    );
    text(&built.stdout).trim().to_string()
}

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, c)| (p.to_string(), c.to_string()))
        .collect()
}

const WORDS: &str = "def count_words(text):\n    return len(text.split())\n";
const WORDS_TEST: &str = "import unittest\n\nfrom stats.words import count_words\n\n\n\
class WordsTest(unittest.TestCase):\n    def test_counts(self):\n        \
self.assertEqual(count_words(''), 0)\n        self.assertEqual(count_words(' a  b\\nc '), 3)\n";
/// The first attempt's bug: a last line without a newline is not counted.
const LINES_BAD: &str = "def count_lines(text):\n    return text.count('\\n')\n";
const LINES: &str = "def count_lines(text):\n    if not text:\n        return 0\n    \
return text.count('\\n') + (0 if text.endswith('\\n') else 1)\n";
const LINES_TEST: &str = "import unittest\n\nfrom stats.lines import count_lines\n\n\n\
class LinesTest(unittest.TestCase):\n    def test_counts(self):\n        \
self.assertEqual(count_lines(''), 0)\n        self.assertEqual(count_lines('a\\nb'), 2)\n        \
self.assertEqual(count_lines('a\\n'), 1)\n";
const CLI: &str = "import sys\n\nfrom stats.lines import count_lines\nfrom stats.words import count_words\n\n\n\
def main(argv):\n    for path in argv:\n        try:\n            with open(path) as f:\n                \
text = f.read()\n        except OSError as e:\n            print(e, file=sys.stderr)\n            \
return 2\n        print(path, count_words(text), count_lines(text))\n    return 0\n";
const CLI_TEST: &str = "import io, os, tempfile, unittest\nfrom contextlib import redirect_stdout\n\n\
from stats.cli import main\n\n\nclass CliTest(unittest.TestCase):\n    def test_counts(self):\n        \
with tempfile.TemporaryDirectory() as d:\n            p = os.path.join(d, 'f')\n            \
with open(p, 'w') as f:\n                f.write('a b\\nc\\n')\n            out = io.StringIO()\n            \
with redirect_stdout(out):\n                self.assertEqual(main([p]), 0)\n            \
self.assertEqual(out.getvalue(), p + ' 3 2\\n')\n            \
self.assertEqual(main([os.path.join(d, 'missing')]), 2)\n";

/// What the stand-in's "model" writes for each task and attempt.
fn script() -> model_api::Script {
    let mut s = model_api::Script::new();
    s.insert(
        "words".into(),
        vec![files(&[
            ("stats/words.py", WORDS),
            ("tests/test_words.py", WORDS_TEST),
        ])],
    );
    s.insert(
        "lines".into(),
        vec![
            files(&[
                ("stats/lines.py", LINES_BAD),
                ("tests/test_lines.py", LINES_TEST),
            ]),
            files(&[
                ("stats/lines.py", LINES),
                ("tests/test_lines.py", LINES_TEST),
            ]),
        ],
    );
    s.insert(
        "cli".into(),
        vec![files(&[
            ("stats/cli.py", CLI),
            ("tests/test_cli.py", CLI_TEST),
        ])],
    );
    s
}

#[test]
fn vm_claude_the_example_plan_goes_green_with_the_real_claude_code() {
    claude_image();
    let home = private_home();

    // The example, as a user would have it: its repo a git repository.
    let d = tempfile::tempdir().unwrap();
    let cp = std::process::Command::new("cp")
        .arg("-r")
        .arg(example())
        .arg(d.path().join("claude"))
        .status()
        .unwrap();
    assert!(cp.success());
    let plan = d.path().join("claude/plan.toml");
    let repo = d.path().join("claude/repo");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "stats: empty package"]);

    // The model API: the stand-in under the real name, with a certificate
    // from a test CA the gateways trust (never the guests: they trust only
    // dough's CA, which their gateway re-signs with).
    let s = dough_net::testing::random_tag();
    let world = World::new(&format!("m{s}"), dough_net::testing::world_net(193)).unwrap();
    let (ca, ca_pem) = https::test_ca();
    let roots = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(roots.path(), &ca_pem).unwrap();
    let listener = dough_net::linux::in_netns(Some(&world.ns), || {
        std::net::TcpListener::bind((world.addr, 443))
            .map_err(|e| dough_net::NetError::io("bind", e))
    })
    .unwrap();
    let api = model_api::serve(
        listener,
        https::server_config(&ca, "api.anthropic.com"),
        REAL_KEY,
        script(),
    );

    let hosts = format!("api.anthropic.com={}", world.addr);
    let roots_path = roots.path().display().to_string();
    let (out, run, report) = go(
        home.path(),
        &plan,
        &[
            ("DOUGH_TEST_GATEWAY_HOSTS", &hosts),
            ("DOUGH_TEST_GATEWAY_ROOTS", &roots_path),
            ("ANTHROPIC_API_KEY", REAL_KEY),
        ],
    );
    let seen = api.seen.lock().unwrap().clone();
    assert!(
        out.status.success(),
        "{}\n{report}\nthe stand-in saw: {seen:#?}",
        text(&out.stderr)
    );
    for id in ["words", "lines", "cli"] {
        assert_eq!(task(&run, id)["outcome"], "green", "{id}: {report}");
    }
    assert_eq!(task(&run, "lines")["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(task(&run, "words")["attempts"].as_array().unwrap().len(), 1);

    // What the real CLI wrote is what was committed.
    let branch = format!("dough/{}", run["run_id"].as_str().unwrap());
    assert_eq!(
        git(&repo, &["show", &format!("{branch}:stats/lines.py")]),
        LINES.trim_end()
    );
    assert_eq!(
        git(&repo, &["show", &format!("{branch}:stats/cli.py")]),
        CLI.trim_end()
    );

    // The stand-in saw the real key on every request (the guests had only a
    // placeholder), each task's work order, the retry as a second attempt,
    // and the CLI come back with its tool results.
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|s| s.key_ok), "{seen:#?}");
    for (id, attempt) in [("words", 1), ("lines", 1), ("lines", 2), ("cli", 1)] {
        assert!(
            seen.iter().any(|s| s.task.as_deref() == Some(id)
                && s.attempt == attempt
                && s.answer.starts_with("write:")),
            "no work order for {id} #{attempt}: {seen:#?}"
        );
    }
    assert!(seen.iter().any(|s| s.answer == "done"), "{seen:#?}");
    let run_text = run.to_string();
    assert!(!run_text.contains(REAL_KEY) && !report.contains(REAL_KEY));
}

/// A clone of the recipe's image installs from npm through this host's
/// network — behind a TLS-intercepting proxy too: the recipe's `ca = "host"`
/// is in the image's bundle and NODE_EXTRA_CA_CERTS names it. (Needs the npm
/// registry, which these machines and CI reach; so does building the image.)
#[test]
fn vm_claude_npm_install_works_in_a_clone_of_the_recipes_image() {
    let id = claude_image();
    let home = private_home();
    let out = run(
        home.path(),
        &[
            "run",
            "--image",
            &id,
            "--net",
            "nat",
            "--",
            "sh",
            "-c",
            "cd /tmp && npm install --no-audit --no-fund is-number@7.0.0 >/dev/null && \
             node -e 'console.log(require(\"is-number\")(7))'",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "true");
}
