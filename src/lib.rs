//! runnel: a CI build agent. A scheduler hands it jobs over gRPC; for each
//! job it installs the job's SSH keys with pinned host keys, checks out the
//! repository and its submodules with libgit2 (user key before deploy key),
//! runs the steps in a clean container and streams every byte of output.

pub mod api;
pub mod checkout;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fleet;
pub mod job;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod ssh;
pub mod store;
pub mod sys;

/// The layers, lowest first: a module may use only modules of a lower
/// layer (ARCHITECTURE.md, "Layers").
#[cfg(test)]
const LAYERS: &[&[&str]] = &[
    &["model", "sys"],
    &["ssh", "logs", "runtime", "metrics", "store"],
    &["checkout"],
    &["config"],
    &["job"],
    &["api"],
    &["fleet"],
    &["daemon"],
    &["cli"],
];

#[cfg(test)]
mod layers {
    use std::path::Path;

    fn layer_of(module: &str) -> usize {
        super::LAYERS
            .iter()
            .position(|l| l.contains(&module))
            .unwrap_or_else(|| panic!("module {module:?} is in no layer: add it to LAYERS in lib.rs"))
    }

    /// Every `crate::NAME` a file names outside comments.
    fn imports(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                let name: String = rest[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
                rest = &rest[i + 7..];
            }
        }
        out
    }

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_module_imports_a_module_of_its_own_or_a_higher_layer() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let mut wrong = Vec::new();
        for path in all {
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str().to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains("super::super::"),
                "{}: reaches above its module with super::super",
                rel.display()
            );
            for name in imports(&text) {
                if name != module && layer_of(&name) >= layer_of(&module) {
                    wrong.push(format!("{} uses crate::{name}", rel.display()));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "imports that do not point down:\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn the_check_sees_an_upward_import() {
        let found =
            imports("use crate::job::Registry; // crate::cli\nlet x = crate::model::Secret::new(b\"\");");
        assert_eq!(found, ["job", "model"]);
        assert!(layer_of("job") > layer_of("runtime"));
    }
}
