//! Cache keys: CircleCI's templates (`{{ checksum "FILE" }}`,
//! `{{ .Branch }}`, `{{ .Revision }}`, `{{ .Environment.VAR }}`,
//! `{{ epoch }}`, `{{ arch }}`) rendered, and the result checked to be a
//! name under the project: it can never climb out of it.

use std::collections::{BTreeMap, BTreeSet};

/// Longest key, in bytes, after rendering.
pub const MAX_KEY_BYTES: usize = 512;

/// What a template may read.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub branch: String,
    pub revision: String,
    pub env: BTreeMap<String, String>,
    pub epoch: u64,
    /// sha256 (hex) of each file a `checksum` names, as the step sees it.
    pub checksums: BTreeMap<String, String>,
    /// Variables that hold secrets: a key never takes their values (keys
    /// are names in the store, listed in the clear).
    pub secrets: BTreeSet<String>,
}

/// `{{ arch }}`: the agent's OS and architecture, as CircleCI's words.
pub fn arch() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    format!("{}-{arch}", std::env::consts::OS)
}

/// One `{{ ... }}` of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part<'a> {
    Text(&'a str),
    Checksum(String),
    Branch,
    Revision,
    Env(&'a str),
    Epoch,
    Arch,
}

fn parse<'a>(field: &str, template: &'a str) -> Result<Vec<Part<'a>>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("{field}: {template:?} has a {{{{ without its }}}}"))?;
        let expr = after[..close].trim();
        let part = if let Some(file) = expr.strip_prefix("checksum") {
            let file = file.trim();
            let name = file
                .strip_prefix('"')
                .and_then(|f| f.strip_suffix('"'))
                .filter(|f| !f.is_empty())
                .ok_or_else(|| format!("{field}: {{{{ {expr} }}}}: checksum takes a quoted file name: {{{{ checksum \"package-lock.json\" }}}}"))?;
            Part::Checksum(name.to_string())
        } else if let Some(var) = expr.strip_prefix(".Environment.") {
            Part::Env(var)
        } else {
            match expr {
                ".Branch" => Part::Branch,
                ".Revision" => Part::Revision,
                "epoch" => Part::Epoch,
                "arch" => Part::Arch,
                _ => {
                    return Err(format!(
                        "{field}: {{{{ {expr} }}}} is not a template runnel knows: use checksum \"FILE\", \
                         .Branch, .Revision, .Environment.VAR, epoch or arch"
                    ));
                }
            }
        };
        parts.push(part);
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

/// The files a template takes the checksum of.
pub fn checksum_files(field: &str, template: &str) -> Result<Vec<String>, String> {
    Ok(parse(field, template)?
        .into_iter()
        .filter_map(|p| match p {
            Part::Checksum(f) => Some(f),
            _ => None,
        })
        .collect())
}

/// `template` rendered and checked ([`check`]); an error names `field`.
pub fn render(field: &str, template: &str, cx: &Context) -> Result<String, String> {
    let mut out = String::new();
    for part in parse(field, template)? {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Checksum(f) => {
                out.push_str(cx.checksums.get(&f).ok_or_else(|| {
                    format!("{field}: {{{{ checksum {f:?} }}}}: the file could not be read")
                })?)
            }
            Part::Branch => out.push_str(&cx.branch),
            Part::Revision => out.push_str(&cx.revision),
            Part::Env(v) if cx.secrets.contains(v) => {
                return Err(format!(
                    "{field}: {{{{ .Environment.{v} }}}} names a secret, and a key is a name the store \
                     keeps and lists in the clear: key on a checksum of a file instead"
                ));
            }
            Part::Env(v) => out.push_str(cx.env.get(v).map(String::as_str).unwrap_or("")),
            Part::Epoch => out.push_str(&cx.epoch.to_string()),
            Part::Arch => out.push_str(&arch()),
        }
    }
    check(field, &out)?;
    Ok(out)
}

/// A key is a relative name: not empty, at most [`MAX_KEY_BYTES`], no
/// control characters or backslashes, no empty, `.` or `..` segment, not
/// absolute. What it names stays under its project.
pub fn check(field: &str, key: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{field}: the key {key:?} {why}"));
    if key.is_empty() {
        return bad("is empty (after its templates)");
    }
    if key.len() > MAX_KEY_BYTES {
        return bad(&format!("is longer than {MAX_KEY_BYTES} bytes"));
    }
    if key.chars().any(char::is_control) {
        return bad("holds a control character");
    }
    if key.starts_with('/') {
        return bad("is absolute: keys are names under the project");
    }
    if key.contains('\\') {
        return bad("holds a backslash");
    }
    if key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return bad("has an empty, \".\" or \"..\" segment: keys are names under the project");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context {
        Context {
            branch: "main".into(),
            revision: "abc123".into(),
            env: [("NODE".to_string(), "22".to_string())].into(),
            epoch: 1700000000,
            checksums: [("package-lock.json".to_string(), "f00d".to_string())].into(),
            secrets: ["NPM_TOKEN".to_string()].into(),
        }
    }

    #[test]
    fn a_secret_is_never_rendered_into_a_key() {
        let mut c = cx();
        c.env.insert("NPM_TOKEN".into(), "s3cr3t".into());
        let e = render("steps[1].save_cache.key", "v1-{{ .Environment.NPM_TOKEN }}", &c).unwrap_err();
        assert!(
            e.starts_with("steps[1].save_cache.key: {{ .Environment.NPM_TOKEN }} names a secret"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t"), "{e}");
    }

    #[test]
    fn templates_render_as_circleci_does() {
        let t = r#"v1-{{ .Branch }}-{{.Revision}}-{{ .Environment.NODE }}-{{ checksum "package-lock.json" }}-{{ epoch }}-{{ arch }}"#;
        assert_eq!(
            checksum_files("f", t).unwrap(),
            vec!["package-lock.json".to_string()]
        );
        assert_eq!(
            render("f", t, &cx()).unwrap(),
            format!("v1-main-abc123-22-f00d-1700000000-{}", arch())
        );
        assert_eq!(render("f", "v1-{{ .Environment.NONE }}x", &cx()).unwrap(), "v1-x");
    }

    #[test]
    fn bad_templates_and_keys_name_the_field() {
        for (t, says) in [
            ("v1-{{ .Nope }}", "is not a template runnel knows"),
            ("v1-{{ checksum lock }}", "checksum takes a quoted file name"),
            ("v1-{{ .Branch", "without its }}"),
            ("{{ checksum \"other\" }}", "could not be read"),
            ("../other-project/x", "\"..\" segment"),
            ("/abs", "is absolute"),
            ("a//b", "empty"),
            ("a\nb", "control character"),
            ("{{ .Environment.NONE }}", "is empty"),
        ] {
            let e = render("save_cache.key", t, &cx()).unwrap_err();
            assert!(e.starts_with("save_cache.key: "), "{e}");
            assert!(e.contains(says), "{t:?}: {e}");
        }
        let long = "a".repeat(MAX_KEY_BYTES + 1);
        assert!(check("k", &long).unwrap_err().contains("longer than"));
        let mut cx = cx();
        cx.branch = "../../etc".into();
        assert!(render("restore_cache.keys[0]", "v1-{{ .Branch }}", &cx).is_err());
    }
}
