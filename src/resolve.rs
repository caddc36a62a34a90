//! Finds a model on disk: a directory, a file, or a hub id already in the local HF cache (offline).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The HF hub cache directory, as huggingface_hub computes it.
fn hub_cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE")) {
        dirs.push(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        dirs.push(PathBuf::from(home).join("hub"));
    } else if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        dirs.push(PathBuf::from(xdg).join("huggingface").join("hub"));
    } else if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cache").join("huggingface").join("hub"));
    }
    dirs
}

/// Resolves `name` to a local directory or file.
pub fn resolve_model(name: &str) -> Result<PathBuf> {
    let direct = Path::new(name);
    if direct.exists() {
        return Ok(direct.to_path_buf());
    }
    let mut looked = vec![direct.display().to_string()];
    // A hub id is "org/name" or "name", never an absolute path.
    if !name.starts_with('/') && !name.starts_with('.') && name.split('/').count() <= 2 {
        let folder = format!("models--{}", name.replace('/', "--"));
        for cache in hub_cache_dirs() {
            let repo = cache.join(&folder);
            looked.push(repo.display().to_string());
            if let Some(snapshot) = snapshot_of(&repo) {
                return Ok(snapshot);
            }
        }
    }
    Err(Error::NotFound {
        path: direct.to_path_buf(),
        message: format!(
            "model {name:?} not found; kvgen looked in: {}. Pass a model directory, a .gguf file, or a hub id that is already downloaded (kvgen never downloads)",
            looked.join(", ")
        ),
    })
}

/// The snapshot `refs/main` points to, or else the only/first snapshot present.
fn snapshot_of(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(hash.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&snapshots).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    entries.into_iter().find(|p| p.is_dir())
}
