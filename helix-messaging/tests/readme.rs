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
