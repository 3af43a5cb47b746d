//! Dialog text for the tests.
//!
//! `QUIP_CORPUS` names a folder with one subfolder per language, each holding YAML files whose
//! top-level `conversations` key is a list of conversations, each a list of turns. A relative
//! `QUIP_CORPUS` is taken from the workspace root. When it is unset or names no folder, the
//! project's own fixture `tests/fixtures/multilingual.yml` (same layout) stands in for every
//! language.

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use crate::workspace_root;

/// One conversation: its turns, in order.
pub type Conversation = Vec<String>;

/// The language name [`corpus_or_fixture_languages`] gives when there is no corpus.
pub const FIXTURE_LANGUAGE: &str = "fixture";

/// The corpus folder named by `QUIP_CORPUS`, if it is set and is a folder.
pub fn corpus_dir() -> Option<PathBuf> {
    let value = std::env::var_os("QUIP_CORPUS").filter(|v| !v.is_empty())?;
    let dir = workspace_root().join(value);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "QUIP_CORPUS={} is not a folder; using the fixture {}",
            dir.display(),
            fixture_path().display()
        );
        None
    }
}

/// The project's fixture.
pub fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/multilingual.yml")
}

/// The corpus's language folders, sorted; `[FIXTURE_LANGUAGE]` when there is no corpus.
pub fn corpus_or_fixture_languages() -> Vec<String> {
    let Some(dir) = corpus_dir() else {
        return vec![FIXTURE_LANGUAGE.to_owned()];
    };
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing the corpus {}: {e}", dir.display()));
    let mut languages: Vec<String> = entries
        .map(|entry| entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())))
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .collect();
    languages.sort();
    assert!(
        !languages.is_empty(),
        "the corpus {} has no language folder",
        dir.display()
    );
    languages
}

/// Every conversation of `languages`, in language order then file-name order. Without a corpus
/// this is the fixture's conversations, whatever the languages asked for.
pub fn load_corpus(languages: &[&str]) -> Vec<Conversation> {
    let Some(dir) = corpus_dir() else {
        return load_file(&fixture_path());
    };
    let mut conversations = Vec::new();
    for language in languages {
        let folder = dir.join(language);
        let entries = std::fs::read_dir(&folder).unwrap_or_else(|e| {
            panic!(
                "the corpus has no language folder {}: {e}",
                folder.display()
            )
        });
        let mut files: Vec<PathBuf> = entries
            .map(|entry| {
                entry
                    .unwrap_or_else(|e| panic!("listing {}: {e}", folder.display()))
                    .path()
            })
            .filter(|path| {
                matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("yml" | "yaml")
                )
            })
            .collect();
        files.sort();
        for file in files {
            conversations.extend(load_file(&file));
        }
    }
    conversations
}

fn load_file(path: &Path) -> Vec<Conversation> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading corpus file {}: {e}", path.display()));
    parse_conversations(&text, path)
}

/// The conversations of one YAML document (`origin` names it in panics). Turns that are
/// scalars become their string form (`42`, `true`); other turns are skipped, as are nulls. A
/// conversation written as a single scalar is one turn. A document without `conversations`
/// has none.
pub fn parse_conversations(yaml: &str, origin: &Path) -> Vec<Conversation> {
    // A byte-order mark starts some corpus files; serde_yaml_ng takes it for a second document.
    let yaml = yaml.strip_prefix('\u{feff}').unwrap_or(yaml);
    let document: Value = serde_yaml_ng::from_str(yaml)
        .unwrap_or_else(|e| panic!("corpus file {} is not YAML: {e}", origin.display()));
    let Some(list) = document.get("conversations") else {
        return Vec::new();
    };
    let Some(list) = list.as_sequence() else {
        panic!(
            "corpus file {}: `conversations` is not a list",
            origin.display()
        );
    };
    list.iter()
        .filter_map(|conversation| {
            let turns: Conversation = match untag(conversation) {
                Value::Sequence(turns) => turns.iter().filter_map(scalar).collect(),
                other => scalar(other).into_iter().collect(),
            };
            (!turns.is_empty()).then_some(turns)
        })
        .collect()
}

fn untag(value: &Value) -> &Value {
    match value {
        Value::Tagged(tagged) => untag(&tagged.value),
        other => other,
    }
}

fn scalar(value: &Value) -> Option<String> {
    match untag(value) {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_become_strings_and_the_rest_is_skipped() {
        let yaml = "conversations:\n- - hi\n  - 42\n  - true\n  - 2.5\n  - {a: b}\n  - [x]\n  - ~\n- just one\n- []\n";
        let conversations = parse_conversations(yaml, Path::new("inline"));
        assert_eq!(
            conversations,
            vec![
                vec!["hi".to_owned(), "42".into(), "true".into(), "2.5".into()],
                vec!["just one".to_owned()],
            ]
        );
        assert!(parse_conversations("categories: [x]\n", Path::new("inline")).is_empty());
        let with_bom = "\u{feff}conversations:\n- - hi\n";
        assert_eq!(
            parse_conversations(with_bom, Path::new("bom")),
            vec![vec!["hi".to_owned()]]
        );
    }

    #[test]
    fn the_fixture_has_every_kind_of_text() {
        let conversations = load_file(&fixture_path());
        let turns: Vec<&String> = conversations.iter().flatten().collect();
        assert!(
            (12..=20).contains(&conversations.len()),
            "{}",
            conversations.len()
        );
        let has = |what: &str, f: &dyn Fn(&str) -> bool| {
            assert!(turns.iter().any(|t| f(t)), "the fixture lacks {what}");
        };
        let in_range =
            |lo: u32, hi: u32| move |t: &str| t.chars().any(|c| (lo..=hi).contains(&(c as u32)));
        has("Cyrillic", &in_range(0x400, 0x4ff));
        has("Greek", &in_range(0x370, 0x3ff));
        has("Hebrew", &in_range(0x590, 0x5ff));
        has("Arabic", &in_range(0x600, 0x6ff));
        has("CJK", &in_range(0x4e00, 0x9fff));
        has("Devanagari", &in_range(0x900, 0x97f));
        has("Thai", &in_range(0xe00, 0xe7f));
        has("a ZWJ sequence", &|t| t.contains('\u{200d}'));
        has("a flag", &in_range(0x1f1e6, 0x1f1ff));
        has("a combining mark", &|t| t.contains("e\u{301}"));
        has("a multi-line turn", &|t| t.contains('\n'));
        has("a number", &|t| t == "42");
        has("a boolean", &|t| t == "true");
        has("a ~2 KB line", &|t| t.len() > 1900 && !t.contains('\n'));
    }
}
