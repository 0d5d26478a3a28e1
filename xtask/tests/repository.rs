//! Repository checks that run as tests, as rust-analyzer's xtask does: the docs a newcomer reads
//! first must say true, well-formed things.

use std::fs;
use std::path::Path;

use xtask::workspace_root;

fn read(rel: &str) -> String {
    fs::read_to_string(workspace_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The fenced blocks of `lang` in a Markdown text.
fn fenced<'a>(text: &'a str, lang: &str) -> Vec<&'a str> {
    let open = format!("```{lang}\n");
    text.split(open.as_str()).skip(1).filter_map(|rest| rest.split_once("```").map(|(b, _)| b)).collect()
}

#[test]
fn readme_json_examples_parse() {
    let readme = read("README.md");
    let blocks = fenced(&readme, "json");
    assert!(!blocks.is_empty(), "README shows the JSON output");
    for block in blocks {
        // A strict parser: comments or trailing commas, which users copy into tests, fail here.
        if let Err(e) = json_check(block) {
            panic!("README JSON block does not parse ({e}):\n{block}");
        }
    }
}

/// A minimal strict JSON syntax check (xtask keeps its dependencies few).
fn json_check(text: &str) -> Result<(), String> {
    let mut p = Json { s: text.as_bytes(), i: 0 };
    p.value()?;
    p.ws();
    if p.i == p.s.len() { Ok(()) } else { Err(format!("trailing text at byte {}", p.i)) }
}

struct Json<'a> {
    s: &'a [u8],
    i: usize,
}

impl Json<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }
    fn value(&mut self) -> Result<(), String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => self.seq(b'{', b'}', true),
            Some(b'[') => self.seq(b'[', b']', false),
            Some(b'"') => self.string(),
            Some(c) if c.is_ascii_digit() || *c == b'-' => {
                while self.s.get(self.i).is_some_and(|c| c.is_ascii_digit() || b"-+.eE".contains(c)) {
                    self.i += 1;
                }
                Ok(())
            }
            _ => {
                for word in ["true", "false", "null"] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(());
                    }
                }
                Err(format!("unexpected text at byte {}", self.i))
            }
        }
    }
    fn seq(&mut self, open: u8, close: u8, object: bool) -> Result<(), String> {
        self.eat(open)?;
        self.ws();
        if self.s.get(self.i) == Some(&close) {
            self.i += 1;
            return Ok(());
        }
        loop {
            if object {
                self.ws();
                self.string()?;
                self.eat(b':')?;
            }
            self.value()?;
            self.ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(c) if *c == close => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(format!("expected ',' or '{}' at byte {}", close as char, self.i)),
            }
        }
    }
    fn string(&mut self) -> Result<(), String> {
        self.eat(b'"')?;
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            match c {
                b'\\' => self.i += 1,
                b'"' => return Ok(()),
                _ => {}
            }
        }
        Err("unterminated string".into())
    }
}

#[test]
fn json_check_rejects_what_users_trip_on() {
    assert!(json_check(r#"{ "a": [1, 2.5e3, null], "b": "x\"y" }"#).is_ok());
    assert!(json_check("{ \"a\": 1 // note\n }").is_err());
    assert!(json_check(r#"{ "a": 1, }"#).is_err());
}

#[test]
fn licenses_named_in_the_manifests_exist() {
    let root = workspace_root();
    for file in ["LICENSE-MIT", "LICENSE-APACHE"] {
        assert!(root.join(file).is_file(), "{file} at the workspace root");
    }
    assert!(read("Cargo.toml").contains(r#"license = "MIT OR Apache-2.0""#));
    // Every published crate ships both files (cargo package follows the symlinks).
    for entry in fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = dir.join("Cargo.toml");
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("qlock")
            && manifest.is_file()
            && !read_path(&manifest).contains("publish = false")
        {
            for file in ["LICENSE-MIT", "LICENSE-APACHE"] {
                assert!(dir.join(file).is_file(), "{name}/{file}");
            }
        }
    }
}

fn read_path(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn docs_point_at_documents_in_the_repository() {
    let root = workspace_root();
    assert!(root.join("docs/protocol.md").is_file());
    let outside = concat!("spec", " section"); // spelled apart so this file does not match
    let mut stale = Vec::new();
    visit(&root, &mut |path, text| {
        if text.contains(outside) {
            stale.push(path.display().to_string());
        }
    });
    assert!(stale.is_empty(), "cite docs/protocol.md, not an outside spec: {stale:?}");
}

/// Calls `f` on every tracked-looking source and Markdown file (not target/, not hidden dirs).
fn visit(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            visit(&path, f);
        } else if name.ends_with(".rs") || name.ends_with(".md") {
            f(&path, &read_path(&path));
        }
    }
}
