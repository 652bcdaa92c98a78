//! Recursive submodule checkout with the job's keys and pinned hosts.
//! Relative URLs resolve against the superproject's URL (as git does); a
//! submodule whose path or name would leave the workspace is refused before
//! anything is written for it.

use std::path::Path;

use git2::Repository;

use super::{CheckoutError, Ctx, MirrorUse, SubmoduleDone, check_out_detached, contained_path};
use crate::model::state::FailureKind;

/// Resolves a submodule URL from `.gitmodules` against the superproject's.
pub(crate) fn resolve_url(base: &str, url: &str) -> String {
    if !(url.starts_with("./") || url.starts_with("../")) {
        return url.to_string();
    }
    let mut base = base.trim_end_matches('/').to_string();
    let mut rel = url;
    loop {
        if let Some(r) = rel.strip_prefix("./") {
            rel = r;
        } else if let Some(r) = rel.strip_prefix("../") {
            rel = r;
            match base.rfind(['/', ':']) {
                Some(i) if &base[i..=i] == ":" => base.truncate(i + 1),
                Some(i) => base.truncate(i),
                None => base.clear(),
            }
        } else {
            break;
        }
    }
    if base.ends_with(':') || base.is_empty() {
        format!("{base}{rel}")
    } else {
        format!("{base}/{rel}")
    }
}

fn refuse(what: String) -> CheckoutError {
    CheckoutError::new(FailureKind::Checkout, what)
}

/// Checks out every submodule of `repo` (whose URL is `repo_url`), then
/// theirs. `prefix` is the path of `repo` inside the workspace.
pub(super) fn update(
    repo: &Repository,
    repo_url: &str,
    ctx: &Ctx<'_>,
    prefix: &str,
    done: &mut Vec<SubmoduleDone>,
    uses: &mut Vec<MirrorUse>,
) -> Result<(), CheckoutError> {
    let git_err = |what: &str, e: git2::Error| {
        CheckoutError::new(FailureKind::Checkout, format!("{what}: {}", e.message()))
    };
    let workdir = repo
        .workdir()
        .ok_or_else(|| {
            refuse(format!(
                "{prefix}: a bare repository has no submodules to check out"
            ))
        })?
        .to_path_buf();
    refuse_escaping_names(repo, &workdir, prefix)?;
    let gitmodules = git2::Config::open(&workdir.join(".gitmodules")).ok();
    let submodules = repo
        .submodules()
        .map_err(|e| git_err("cannot read .gitmodules", e))?;
    for mut sm in submodules {
        let name = sm.name().unwrap_or("").to_string();
        let rel = sm.path().to_string_lossy().to_string();
        let shown = format!("{prefix}{rel}");
        let what = format!("submodule {shown}");
        let Some(dest) = contained_path(&workdir, &rel) else {
            return Err(refuse(format!(
                "{what}: its path {rel:?} leaves the workspace; refusing to check it out"
            )));
        };
        if contained_path(&repo.path().join("modules"), &name).is_none() {
            return Err(refuse(format!(
                "{what}: its name {name:?} would leave the repository's .git/modules; refusing it"
            )));
        }
        refuse_symlinks_on_the_way(&workdir, &rel).map_err(|why| refuse(format!("{what}: {why}")))?;
        if !dest.starts_with(ctx.workspace) {
            return Err(refuse(format!("{what}: path leaves the workspace")));
        }
        let raw_url = sm
            .url()
            .ok()
            .flatten()
            .ok_or_else(|| refuse(format!("{what}: has no URL in .gitmodules")))?
            .to_string();
        let url = resolve_url(repo_url, &raw_url);
        let pinned = sm
            .index_id()
            .or(sm.head_id())
            .ok_or_else(|| refuse(format!("{what}: the superproject records no commit for it")))?;
        sm.init(true).map_err(|e| git_err(&what, e))?;
        // `update = none`: git initialises it and leaves its directory empty.
        if sm.update_strategy() == git2::SubmoduleUpdate::None {
            continue;
        }
        // Outside a sparse checkout's cone its directory was not made; git
        // checks it out all the same.
        std::fs::create_dir_all(&dest).map_err(|e| refuse(format!("{what}: {e}")))?;
        repo.config()
            .and_then(|mut c| c.set_str(&format!("submodule.{name}.url"), &url))
            .map_err(|e| git_err(&what, e))?;
        sm.reload(true).map_err(|e| git_err(&what, e))?;
        let sub = sm.repo_init(true).map_err(|e| git_err(&what, e))?;
        let cached = uses.len();
        // Submodules are fetched in full: a pinned commit may be deep in history.
        let key = ctx.fetch_into(&sub, &url, 0, &what, &[], uses)?;
        let sub = sm.open().map_err(|e| git_err(&what, e))?;
        let borrowed = uses.len() > cached;
        // A commit no ref advertises is fetched by id; one the server does
        // not have is the job's problem, never the cache's.
        if !ctx.ensure_commit(&sub, &url, &what, pinned, borrowed)? {
            return Err(refuse(format!(
                "{what}: its pinned commit {pinned} is not in {url}, not even fetched by id \
                 (is it pushed? does the server allow fetching commits by id?)"
            )));
        }
        let sub = sm.open().map_err(|e| git_err(&what, e))?;
        check_out_detached(&sub, pinned, ctx.cancel, ctx.owner).map_err(|e| {
            let mut out = refuse(format!(
                "{what}: cannot check out its pinned commit {pinned}: {}",
                e.message()
            ));
            out.refused = super::is_refusal(&e);
            if borrowed { out.blaming_cache(&url) } else { out }
        })?;
        // `shallow = true`: git clones it with --depth 1.
        let shallow = gitmodules
            .as_ref()
            .and_then(|c| c.get_bool(&format!("submodule.{name}.shallow")).ok())
            .unwrap_or(false);
        if shallow {
            super::make_shallow(&sub, pinned, 1).map_err(|e| refuse(format!("{what}: {e}")))?;
        }
        done.push(SubmoduleDone {
            path: shown.clone(),
            url: url.clone(),
            commit: pinned.to_string(),
            key: key.map(|k| k.kind).unwrap_or(crate::model::KeyKind::None),
        });
        update(&sub, &url, ctx, &format!("{shown}/"), done, uses)?;
    }
    Ok(())
}

/// A submodule whose name would leave `.git/modules` (`../../x`) is
/// refused, as git refuses it ("ignoring suspicious submodule name");
/// libgit2 would silently skip the entry.
fn refuse_escaping_names(repo: &Repository, workdir: &Path, prefix: &str) -> Result<(), CheckoutError> {
    let file = workdir.join(".gitmodules");
    if std::fs::symlink_metadata(&file).is_err() {
        return Ok(());
    }
    let config = git2::Config::open(&file)
        .map_err(|e| refuse(format!("{prefix}.gitmodules cannot be read: {}", e.message())))?;
    let mut entries = config
        .entries(Some(r"^submodule\..*\.(path|url)$"))
        .map_err(|e| refuse(format!("{prefix}.gitmodules cannot be read: {}", e.message())))?;
    while let Some(Ok(entry)) = entries.next() {
        let Some(name) = entry
            .name()
            .ok()
            .and_then(|n| n.strip_prefix("submodule."))
            .and_then(|n| n.rsplit_once('.'))
            .map(|(name, _)| name.to_string())
        else {
            continue;
        };
        if contained_path(&repo.path().join("modules"), &name).is_none() {
            return Err(refuse(format!(
                "{prefix}.gitmodules: submodule name: '{name}' would leave the repository's \
                 .git/modules; refusing it"
            )));
        }
    }
    Ok(())
}

/// A committed symlink on a submodule's path could point the clone
/// anywhere on the host.
fn refuse_symlinks_on_the_way(workdir: &Path, rel: &str) -> Result<(), String> {
    let mut p = workdir.to_path_buf();
    for c in Path::new(rel).components() {
        p.push(c);
        if let Ok(m) = std::fs::symlink_metadata(&p)
            && m.file_type().is_symlink()
        {
            return Err(format!(
                "{} is a symbolic link; refusing to check a submodule out through it",
                p.strip_prefix(workdir).unwrap_or(&p).display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_urls_resolve_like_git() {
        assert_eq!(
            resolve_url("ssh://git@h:2222/org/app.git", "../lib.git"),
            "ssh://git@h:2222/org/lib.git"
        );
        assert_eq!(
            resolve_url("ssh://git@h:2222/org/app.git", "../../other/lib.git"),
            "ssh://git@h:2222/other/lib.git"
        );
        assert_eq!(
            resolve_url("git@h:org/app.git", "../lib.git"),
            "git@h:org/lib.git"
        );
        assert_eq!(resolve_url("git@h:app.git", "../lib.git"), "git@h:lib.git");
        assert_eq!(resolve_url("/srv/app/", "./sub"), "/srv/app/sub");
        assert_eq!(resolve_url("/srv/app", "git@h:x.git"), "git@h:x.git");
    }

    #[test]
    fn contained_paths() {
        let base = Path::new("/w");
        assert!(contained_path(base, "lib/x").is_some());
        for bad in ["../x", "/etc", "a/../../x", "", "."] {
            assert!(contained_path(base, bad).is_none(), "{bad}");
        }
    }
}
