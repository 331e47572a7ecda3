use super::*;

const PLAIN: &str = "diff --git a/calc.py b/calc.py\nindex 1a2b3c4..5d6e7f8 100644\n--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n";

#[test]
fn change_ids_are_sha256_hex() {
    let id = ChangeId::of(b"abc");
    assert_eq!(id.as_str(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(ChangeId::parse(&id.as_str().to_ascii_uppercase()).unwrap(), id);
    assert!(ChangeId::parse("abc").is_err());
    assert!(ChangeId::parse(&"g".repeat(64)).is_err());
}

#[test]
fn a_plain_modification() {
    let files = parse(PLAIN.as_bytes()).unwrap();
    assert_eq!(
        files,
        vec![FileChange {
            old_path: Some("calc.py".into()),
            new_path: Some("calc.py".into()),
            old_mode: Some(MODE_FILE),
            new_mode: Some(MODE_FILE),
            ..FileChange::default()
        }]
    );
    assert!(hidden_findings(&files, &[]).is_empty());
}

#[test]
fn an_added_line_that_looks_like_a_header_is_content() {
    // The hunk says 3 new lines: "+++ b/evil" and "diff --git …" are added lines.
    let d = "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1,3 @@\n-a\n++++ b/.github/workflows/ci.yml\n+diff --git a/y b/y\n+c\n";
    let files = parse(d.as_bytes()).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].new_path.as_deref(), Some("x"));
}

#[test]
fn any_first_component_is_stripped_as_git_apply_does() {
    let d = "--- x/.github/workflows/ci.yml\n+++ y/.github/workflows/ci.yml\n@@ -1 +1 @@\n-a\n+b\n";
    let files = parse(d.as_bytes()).unwrap();
    assert_eq!(files[0].new_path.as_deref(), Some(".github/workflows/ci.yml"));
    assert_eq!(hidden_findings(&files, &[]).len(), 1);
}

#[test]
fn every_hidden_kind_is_critical_unless_granted_exactly() {
    let d = "\
diff --git a/pkg/.gitattributes b/pkg/.gitattributes
new file mode 100644
index 0000000..1111111
--- /dev/null
+++ b/pkg/.gitattributes
@@ -0,0 +1 @@
+*.py -diff
diff --git a/pkg/x.py b/pkg/x.py
index 2222222..3333333 100644
GIT binary patch
literal 3
Kc${NkU}OLQ00031

diff --git a/.gitmodules b/.gitmodules
new file mode 100644
--- /dev/null
+++ b/.gitmodules
@@ -0,0 +1 @@
+[submodule \"v\"]
diff --git a/vendor b/vendor
new file mode 160000
index 0000000..4444444
--- /dev/null
+++ b/vendor
@@ -0,0 +1 @@
+Subproject commit 4444444444444444444444444444444444444444
diff --git a/link b/link
new file mode 120000
--- /dev/null
+++ b/link
@@ -0,0 +1 @@
+/etc/passwd
\\ No newline at end of file
diff --git a/run.sh b/run.sh
old mode 100644
new mode 100755
diff --git a/.gitlab-ci.yml b/.gitlab-ci.yml
--- a/.gitlab-ci.yml
+++ b/.gitlab-ci.yml
@@ -1 +1 @@
-a
+b
diff --git a/.agentfleet/test b/.agentfleet/test
--- a/.agentfleet/test
+++ b/.agentfleet/test
@@ -1 +1 @@
-pytest
+true
";
    let files = parse(d.as_bytes()).unwrap();
    assert_eq!(files.len(), 8, "{files:#?}");
    let found = hidden_findings(&files, &["pkg/".into(), "./".into()]);
    let kinds: Vec<&str> = found.iter().map(|f| f.split(':').nth(1).unwrap().trim()).collect();
    assert_eq!(
        kinds,
        vec![
            "git attributes file, which changes how git shows and applies files",
            "binary patch, which no review can read",
            "submodule definition",
            "gitlink (a submodule pointer)",
            "symbolic link",
            "file made executable",
            "CI/CD configuration",
            "the repository's agentfleet scripts, which the fleet itself runs",
        ]
    );
    // Granting the exact paths lets each through; a folder above them does not.
    let all: Vec<String> = [
        "pkg/.gitattributes",
        "pkg/x.py",
        ".gitmodules",
        "vendor",
        "link",
        "run.sh",
        ".gitlab-ci.yml",
        ".agentfleet/test",
    ]
    .map(str::to_owned)
    .to_vec();
    assert!(hidden_findings(&files, &all).is_empty());
}

#[test]
fn quoted_and_spaced_names() {
    let d = "diff --git \"a/t\\303\\251st\\tx\" \"b/t\\303\\251st\\tx\"\n--- \"a/t\\303\\251st\\tx\"\n+++ \"b/t\\303\\251st\\tx\"\n@@ -1 +1 @@\n-a\n+b\ndiff --git a/with space b/with space\nnew file mode 100755\nindex 0000000..1111111\nGIT binary patch\n";
    let files = parse(d.as_bytes()).unwrap();
    assert_eq!(files[0].new_path.as_deref(), Some("tést\tx"));
    assert_eq!(files[1].new_path.as_deref(), Some("with space"));
    assert!(files[1].binary && files[1].old_path.is_none());
}

#[test]
fn renames_copies_and_deletions() {
    let d = "diff --git a/old.py b/new.py\nsimilarity index 100%\nrename from old.py\nrename to new.py\ndiff --git a/gone.py b/gone.py\ndeleted file mode 100644\n--- a/gone.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n";
    let files = parse(d.as_bytes()).unwrap();
    assert_eq!(files[0].old_path.as_deref(), Some("old.py"));
    assert_eq!(files[0].new_path.as_deref(), Some("new.py"));
    assert_eq!(files[1].new_path, None);
    let staged = vec![
        Staged { path: "gone.py".into(), old_mode: MODE_FILE, new_mode: 0, status: 'D' },
        Staged { path: "new.py".into(), old_mode: 0, new_mode: MODE_FILE, status: 'A' },
        Staged { path: "old.py".into(), old_mode: MODE_FILE, new_mode: 0, status: 'D' },
    ];
    compare_staged(&files, &staged).unwrap();
    let err = compare_staged(&files, &staged[..2]).unwrap_err();
    assert_eq!(err, "the diff describes old.py but git staged nothing there");
}

#[test]
fn staged_differences_are_named() {
    let files = parse(PLAIN.as_bytes()).unwrap();
    let ok = [Staged { path: "calc.py".into(), old_mode: MODE_FILE, new_mode: MODE_FILE, status: 'M' }];
    compare_staged(&files, &ok).unwrap();
    let extra = [ok[0].clone(), Staged { path: "ignored.env".into(), old_mode: 0, new_mode: MODE_FILE, status: 'A' }];
    assert_eq!(
        compare_staged(&files, &extra).unwrap_err(),
        "git staged ignored.env which the approved diff does not describe"
    );
    let exec = [Staged { new_mode: MODE_EXEC, ..ok[0].clone() }];
    assert_eq!(
        compare_staged(&files, &exec).unwrap_err(),
        "git changed the mode of calc.py from 100644 to 100755, which the diff does not state"
    );
    let raw = b":100644 100755 abc def M\0calc.py\0:000000 160000 000 444 A\0vendor\0";
    let parsed = parse_raw(raw).unwrap();
    assert_eq!(parsed[1], Staged { path: "vendor".into(), old_mode: 0, new_mode: MODE_GITLINK, status: 'A' });
}

#[test]
fn unreadable_diffs_are_errors_not_guesses() {
    assert!(parse(b"diff --git a/x b/x\nnew file mode 100777\n").is_err());
    assert!(parse(b"--- \"a/unterminated\n").is_err());
    assert!(parse(b"").unwrap().is_empty());
}

proptest::proptest! {
    #[test]
    fn parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let _ = parse(&bytes);
        let _ = parse_raw(&bytes);
    }

    #[test]
    fn header_soup_never_panics(lines in proptest::collection::vec(
        proptest::prop_oneof![
            proptest::strategy::Just("diff --git a/x b/x".to_owned()),
            proptest::strategy::Just("--- a/x".to_owned()),
            proptest::strategy::Just("+++ /dev/null".to_owned()),
            proptest::strategy::Just("@@ -1,2 +1 @@".to_owned()),
            proptest::strategy::Just("new file mode 120000".to_owned()),
            proptest::strategy::Just("rename to \"q\\".to_owned()),
            "[ -~]{0,20}",
        ], 0..40)) {
        let _ = parse(lines.join("\n").as_bytes());
    }
}
