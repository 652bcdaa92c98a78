//! Sparse checkout in cone mode, as `git sparse-checkout set --cone DIR...`
//! leaves a clone: the files at the top, every file under each directory
//! named, and the files directly inside the directories on the way to one.
//! The index keeps every path (those outside the cone marked
//! skip-worktree), so `git status` is clean and `git sparse-checkout` works
//! in a step.

use std::collections::BTreeSet;

/// The directories of a cone, normalised (`a/b`, no slashes around).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cone {
    dirs: BTreeSet<String>,
}

impl Cone {
    /// `paths` as the job gives them; `Err` names one that is not a
    /// directory path inside the repository.
    pub(crate) fn parse(paths: &[String]) -> Result<Option<Cone>, String> {
        let mut dirs = BTreeSet::new();
        for p in paths {
            let d = p.trim().trim_matches('/');
            let bad = d.is_empty()
                || d.split('/')
                    .any(|c| c.is_empty() || c == "." || c == ".." || c.eq_ignore_ascii_case(".git"))
                || d.contains(['*', '?', '[', '\\', '\n', '\0']);
            if bad {
                return Err(format!(
                    "checkout sparse path {p:?} is not a directory of the repository \
                     (write it like \"src/app\": relative, no '..', no wildcards)"
                ));
            }
            dirs.insert(d.to_string());
        }
        Ok((!dirs.is_empty()).then_some(Cone { dirs }))
    }

    /// Whether the entry at `path` (relative to the top) is checked out.
    pub(crate) fn contains(&self, path: &[u8]) -> bool {
        let Ok(path) = std::str::from_utf8(path) else {
            return false;
        };
        let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        parent.is_empty()
            || self.dirs.iter().any(|d| {
                path.strip_prefix(d.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
                    || d.strip_prefix(parent).is_some_and(|rest| rest.starts_with('/'))
            })
    }

    /// `.git/info/sparse-checkout` as git writes it in cone mode.
    pub(crate) fn patterns(&self) -> String {
        let mut parents = BTreeSet::new();
        for d in &self.dirs {
            let mut p = d.as_str();
            while let Some((up, _)) = p.rsplit_once('/') {
                parents.insert(up.to_string());
                p = up;
            }
        }
        let mut out = String::from("/*\n!/*/\n");
        for p in &parents {
            if !self.dirs.iter().any(|d| p.starts_with(&format!("{d}/"))) {
                out.push_str(&format!("/{p}/\n!/{p}/*/\n"));
            }
        }
        for d in &self.dirs {
            if !self.dirs.iter().any(|o| d.starts_with(&format!("{o}/"))) {
                out.push_str(&format!("/{d}/\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cone_takes_the_top_its_directories_and_the_files_on_the_way() {
        let cone = Cone::parse(&["src/app/".into(), "docs".into()]).unwrap().unwrap();
        for yes in [
            "README",
            "src/app/main.c",
            "src/app/x/y.c",
            "src/top.c",
            "docs/a/b.md",
        ] {
            assert!(cone.contains(yes.as_bytes()), "{yes}");
        }
        for no in ["src/lib/x.c", "other/a", "src/application/x"] {
            assert!(!cone.contains(no.as_bytes()), "{no}");
        }
        assert_eq!(cone.patterns(), "/*\n!/*/\n/src/\n!/src/*/\n/docs/\n/src/app/\n");
        assert!(Cone::parse(&[]).unwrap().is_none());
        for bad in ["../x", "a/../b", "", "*.c", ".git"] {
            assert!(Cone::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
