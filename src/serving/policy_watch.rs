//! Following the fleet's policy file (`sluice serve --policy-file`): a task reads the file
//! every poll interval and, when its bytes change, checks the new contents against every
//! served model and applies them all, or none.
//!
//! Polling rather than inotify: Kubernetes updates a mounted ConfigMap by swapping a `..data`
//! symlink in the volume's folder, which a watch on the file itself never sees (the file it
//! watched is not modified, it is replaced by another path), and editors replace files in
//! the same way. Reading a file of at most 1 MiB twice a second costs nothing, sees every
//! kind of replacement and bounds how late a change is: one poll interval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::ServingCore;
use crate::control::policy_file::PolicyFile;

/// How often the file is read unless `--policy-file-poll-ms` says otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);
/// The poll interval's bounds (`--policy-file-poll-ms`).
pub const POLL_RANGE_MS: std::ops::RangeInclusive<u64> = 50..=60_000;

/// Follows `path` until the task is aborted; `last` holds the bytes applied at start.
pub async fn follow(core: Arc<ServingCore>, path: PathBuf, poll: Duration, mut last: Vec<u8>) {
    let mut interval = tokio::time::interval(poll);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    // The last read error logged, so a file missing for a while is reported once.
    let mut failing: Option<String> = None;
    loop {
        interval.tick().await;
        let p = path.clone();
        let bytes = match tokio::task::spawn_blocking(move || PolicyFile::read_bytes(&p)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                if failing.as_deref() != Some(e.0.as_str()) {
                    tracing::warn!(error = %e, "cannot read the policy file; keeping the live policies");
                    core.metrics.policy_file_refused();
                    failing = Some(e.0);
                }
                continue;
            }
            Err(_) => continue,
        };
        failing = None;
        if bytes == last {
            continue;
        }
        let result = PolicyFile::from_bytes(&path, &bytes).and_then(|file| {
            apply(&core, &path, &file).map_err(crate::control::PolicyError)?;
            Ok(file.version)
        });
        last = bytes;
        match result {
            Ok(version) => tracing::info!(file = %path.display(), version, "policy file applied"),
            Err(e) => {
                core.metrics.policy_file_refused();
                tracing::error!(error = %e, "policy file refused; keeping the live policies");
            }
        }
    }
}

/// Checks `file` against every served model, then applies it to all of them: a model the
/// file names takes its entry, any other its `config.toml` policy. Nothing changes when any
/// check fails; the error names every model and field at fault.
pub fn apply(core: &ServingCore, path: &Path, file: &PolicyFile) -> Result<(), String> {
    let models = core.models();
    for name in file.models.keys() {
        if !models.iter().any(|m| &m.interface.name == name) {
            // A fleet's file may name models other replicas serve; not an error here.
            tracing::warn!(file = %path.display(), model = %name, "the policy file names a model this server does not serve");
        }
    }
    let mut errors = Vec::new();
    let mut prepared = Vec::with_capacity(models.len());
    for m in &models {
        let name = &m.interface.name;
        if let Some((_, applied)) = m.policy.file()
            && file.version <= applied
        {
            errors.push(format!(
                "version: {} is not above the version applied, {applied}: raise it with every change",
                file.version
            ));
            break;
        }
        match m.policy.prepare_file(file.models.get(name), &m.dir.config.policy) {
            Ok(p) => prepared.push((m, p)),
            Err(e) => errors.push(format!("models.{name}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(format!("{}: {}", path.display(), errors.join("; ")));
    }
    let who = format!("policy file {} version {}", path.display(), file.version);
    for (m, p) in prepared {
        m.apply_file_policy(p, file.version, &who)
            .map_err(|e| format!("models.{}: {e}", m.interface.name))?;
    }
    core.metrics.policy_file_applied(file.version);
    Ok(())
}
