//! The diff parser's fuzzer (property-based, like the frame decoder's in
//! dough-proto): arbitrary Unicode in every header a diff can carry, and
//! binary patches with arbitrary declared sizes. The parser must never
//! panic and never unpack more than it allows. `PROPTEST_CASES=200000 cargo
//! test -p dough-gobrr --release --test diff_fuzz` runs it for longer.

use std::io::Write;

use dough_gobrr::diff::{Diff, Rejection, MAX_UNPACKED_BYTES};
use dough_gobrr::glob::Glob;
use proptest::prelude::*;

fn allow() -> Vec<Glob> {
    vec![Glob::new("**").unwrap()]
}

/// Any string, weighted towards what breaks byte arithmetic: multi-byte
/// characters, quotes, backslashes, spaces and path separators.
fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<char>(),
            2 => prop::sample::select(vec!['é', '日', '𝄞', 'ß', '\u{200b}', 'Ω']),
            2 => prop::sample::select(vec!['"', '\\', ' ', '/', 'a', 'b', '\t', '0', '3', '7']),
        ],
        0..24,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// One line of a diff: a real header or body prefix, then arbitrary text.
fn line() -> impl Strategy<Value = String> {
    let prefix = prop::sample::select(vec![
        "diff --git ",
        "diff --git a/",
        "diff --git \"a/",
        "--- ",
        "--- a/",
        "+++ ",
        "+++ b/",
        "rename from ",
        "rename to ",
        "copy from ",
        "copy to ",
        "old mode ",
        "new mode ",
        "new file mode ",
        "deleted file mode ",
        "index ",
        "similarity index ",
        "@@ -",
        "@@ ",
        "GIT binary patch",
        "literal ",
        "delta ",
        " ",
        "+",
        "-",
        "\\",
        "",
    ]);
    (prefix, name(), name()).prop_map(|(p, a, b)| format!("{p}{a} b/{b}\n"))
}

/// `literal N` / `delta N` with zlib data, in git's base85.
fn base85(data: &[u8]) -> String {
    const A: &[u8; 85] =
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";
    let mut out = String::new();
    for chunk in data.chunks(52) {
        let n = chunk.len();
        out.push(if n <= 26 {
            (b'A' + n as u8 - 1) as char
        } else {
            (b'a' + n as u8 - 27) as char
        });
        for group in chunk.chunks(4) {
            let mut w = [0u8; 4];
            w[..group.len()].copy_from_slice(group);
            let mut v = u32::from_be_bytes(w) as u64;
            let mut five = [0u8; 5];
            for d in five.iter_mut().rev() {
                *d = A[(v % 85) as usize];
                v /= 85;
            }
            out.push_str(std::str::from_utf8(&five).unwrap());
        }
        out.push('\n');
    }
    out
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn binary_diff(path: &str, kind: &str, declared: u64, payload: &[u8]) -> String {
    format!(
        "diff --git a/{path} b/{path}\nnew file mode 100644\nindex 0000000..1111111\nGIT binary patch\n{kind} {declared}\n{}\nliteral 0\nHcmV?d00001\n\n",
        base85(&zlib(payload))
    )
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// `diff --git` headers with arbitrary Unicode on either side, alone
    /// and with rename lines: parsed or refused, never a panic.
    #[test]
    fn unicode_headers_never_panic(a in name(), b in name(), rename in any::<bool>()) {
        let mut d = format!("diff --git a/{a} b/{b}\n");
        if rename {
            d += &format!("similarity index 100%\nrename from {a}\nrename to {b}\n");
        }
        let _ = Diff::parse(d.as_bytes()).map(|x| x.check(&allow()));
        let quoted = format!("diff --git \"a/{a}\" \"b/{b}\"\n");
        let _ = Diff::parse(quoted.as_bytes()).map(|x| x.check(&allow()));
        let half = format!("diff --git a/{a} \"b/{b}\"\n");
        let _ = Diff::parse(half.as_bytes()).map(|x| x.check(&allow()));
    }

    /// Any sequence of diff-shaped lines: never a panic.
    #[test]
    fn diff_shaped_lines_never_panic(lines in prop::collection::vec(line(), 1..12)) {
        let d = lines.concat();
        let _ = Diff::parse(d.as_bytes()).map(|x| x.check(&allow()));
    }

    /// A literal is accepted only when it unpacks to exactly its declared
    /// size, and only up to the limit; a lie about the size is refused
    /// without unpacking past it.
    #[test]
    fn literal_sizes_are_checked(len in 0usize..4096, lie in prop_oneof![Just(0i64), -3i64..3, Just(1i64 << 40)]) {
        let payload = vec![7u8; len];
        let declared = (len as i64 + lie).max(0) as u64;
        let r = Diff::parse(binary_diff("src/x.bin", "literal", declared, &payload).as_bytes());
        if declared == len as u64 {
            prop_assert!(r.is_ok(), "{r:?}");
        } else if declared > MAX_UNPACKED_BYTES {
            prop_assert!(matches!(r, Err(Rejection::BinaryTooLarge { .. })), "{r:?}");
        } else {
            prop_assert!(matches!(r, Err(Rejection::Malformed { .. })), "{r:?}");
        }
    }

    /// A delta's result size (inside its compressed data) is bounded too.
    #[test]
    fn delta_result_sizes_are_checked(result in prop_oneof![0u64..1 << 20, Just(MAX_UNPACKED_BYTES + 1), Just(u64::MAX >> 1)]) {
        let mut delta = Vec::new();
        varint(16, &mut delta);
        varint(result, &mut delta);
        delta.push(0x10); // one copy instruction's opcode, then offsets
        let r = Diff::parse(binary_diff("src/x.bin", "delta", delta.len() as u64, &delta).as_bytes());
        if result > MAX_UNPACKED_BYTES {
            prop_assert!(matches!(r, Err(Rejection::BinaryTooLarge { .. })), "{r:?}");
        } else {
            prop_assert!(r.is_ok(), "{r:?}");
        }
    }
}

/// The attack as reported: zlib-compressed zeros declaring 256 MiB, and the
/// same hidden behind a small declared size. Refused before anything is
/// unpacked past the limit.
#[test]
fn a_compressed_zero_bomb_is_refused() {
    let zeros = vec![0u8; 64 << 20];
    let bomb = binary_diff("src/bomb.bin", "literal", zeros.len() as u64, &zeros);
    assert!(bomb.len() < 1 << 20, "the bomb is small: {}", bomb.len());
    assert_eq!(
        Diff::parse(bomb.as_bytes()).unwrap_err(),
        Rejection::BinaryTooLarge {
            path: "src/bomb.bin".into(),
            declared: 64 << 20
        }
    );
    let liar = binary_diff("src/bomb.bin", "literal", 10, &zeros);
    assert!(matches!(
        Diff::parse(liar.as_bytes()),
        Err(Rejection::Malformed { .. })
    ));
    // The reverse block counts too: git inflates both.
    let half = vec![0u8; (MAX_UNPACKED_BYTES / 2 + 1) as usize];
    let both = format!(
        "diff --git a/src/r.bin b/src/r.bin\nindex 1111111..2222222 100644\nGIT binary patch\nliteral {}\n{}\nliteral {}\n{}\n",
        half.len(),
        base85(&zlib(&half)),
        half.len(),
        base85(&zlib(&half))
    );
    assert_eq!(
        Diff::parse(both.as_bytes()).unwrap_err(),
        Rejection::BinaryTotalTooLarge
    );
    // Many patches each under the limit: the total is bounded.
    let each = vec![0u8; (MAX_UNPACKED_BYTES / 2 + 1) as usize];
    let many: String = (0..3)
        .map(|i| binary_diff(&format!("src/{i}.bin"), "literal", each.len() as u64, &each))
        .collect();
    assert_eq!(
        Diff::parse(many.as_bytes()).unwrap_err(),
        Rejection::BinaryTotalTooLarge
    );
}

/// Real git, renaming to names with non-ASCII characters under
/// `core.quotePath=false` (the reported panic): every one parses, with
/// the right paths.
#[test]
fn real_git_renames_to_non_ascii_names_parse() {
    let d = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.quotePath=false",
            ])
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    git(&["init", "-q"]);
    std::fs::create_dir(d.path().join("src")).unwrap();
    let body: String = (0..40).map(|i| format!("line {i}\n")).collect();
    // "a/src/日本語.py b/src/a.py" splits in half inside a character.
    let from = "src/日本語.py";
    std::fs::write(d.path().join(from), &body).unwrap();
    git(&["add", "-A"]);
    git(&["commit", "-qm", "base"]);
    for to in [
        "src/a.py",
        "src/é.py",
        "src/ab.é",
        "src/aé",
        "src/𝄞𝄞",
        "src/ü ü.py",
    ] {
        git(&["mv", from, to]);
        let out = git(&["diff", "--binary", "-M", "--cached", "HEAD"]);
        let diff = Diff::parse(&out)
            .unwrap_or_else(|e| panic!("{to}: {e}\n{}", String::from_utf8_lossy(&out)));
        diff.check(&allow()).unwrap();
        assert_eq!(diff.changed_paths(), vec![to.to_string()]);
        assert!(diff.files[0].rename, "{to}");
        git(&["mv", to, from]);
    }
}
