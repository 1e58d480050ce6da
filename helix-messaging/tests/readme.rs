//! The README's backend table is the one the code's capabilities produce.

use helix_messaging::{KNOWN_BACKENDS, capability_table, compiled_backends};

const START: &str = "<!-- capability-table:start -->";
const END: &str = "<!-- capability-table:end -->";

fn readme_table() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md at the workspace root");
    let start = readme.find(START).expect("table start marker") + START.len();
    let end = readme.find(END).expect("table end marker");
    readme[start..end].trim().to_owned()
}

#[test]
fn readme_capability_table_matches_the_code() {
    let readme = readme_table();
    let generated = capability_table();
    let mut generated_lines = generated.trim().lines();
    let mut readme_lines = readme.lines();
    // Header and separator must match exactly.
    for _ in 0..2 {
        assert_eq!(readme_lines.next(), generated_lines.next(), "table header");
    }
    let readme_rows: Vec<&str> = readme_lines.collect();
    for row in generated_lines {
        assert!(
            readme_rows.contains(&row),
            "README row missing or stale; expected:\n{row}\nREADME table:\n{readme}\nregenerate it from capability_table():\n{generated}"
        );
    }
    for row in &readme_rows {
        let name = row.split('`').nth(1).unwrap_or_default();
        assert!(
            KNOWN_BACKENDS.iter().any(|b| b.name == name),
            "README lists unknown backend {name:?}"
        );
    }
    if compiled_backends().len() == KNOWN_BACKENDS.len() {
        assert_eq!(
            readme,
            generated.trim(),
            "with every backend compiled in, the tables are equal"
        );
    }
}

/// Every `messaging_*` name in the README's metrics section (the mapping from HelixAgent's
/// names included) is one the workspace's code records, so the table names no metric that
/// does not exist.
#[test]
fn readme_metric_names_are_recorded_by_the_code() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let start = readme.find("## Metrics").expect("a Metrics section");
    let end = start
        + readme[start..]
            .find("## Tracing")
            .expect("the next section");
    let mut code = String::new();
    for krate in std::fs::read_dir(root).unwrap() {
        let src = krate.unwrap().path().join("src");
        if src.is_dir() {
            read_rust(&src, &mut code);
        }
    }
    let mut names: Vec<&str> = readme[start..end]
        .split('`')
        .filter_map(|quoted| {
            let name = quoted.split(['{', '(', ' ']).next()?;
            name.starts_with("messaging_").then_some(name)
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 15, "{names:?}");
    for name in names {
        let histogram_part = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix));
        let recorded = code.contains(&format!("\"{name}\""))
            || histogram_part.is_some_and(|base| code.contains(&format!("\"{base}\"")));
        assert!(recorded, "the README names {name}, which no code records");
    }
}

fn read_rust(dir: &std::path::Path, into: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_rust(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}
