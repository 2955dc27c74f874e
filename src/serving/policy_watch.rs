//! Following the fleet's policy file (`sluice serve --policy-file`): a task reads the file
//! every poll interval and, once new bytes have read the same twice in a row ([`SETTLE`]
//! apart), checks them against every served model and applies them to all, or to none.
//!
//! Polling rather than inotify: Kubernetes updates a mounted ConfigMap by swapping a `..data`
//! symlink in the volume's folder, which a watch on the file itself never sees (the file it
//! watched is not modified, it is replaced by another path). Reading a file of at most 1 MiB
//! twice a second costs nothing, sees every kind of replacement and bounds how late a change
//! is: one poll interval and [`SETTLE`].
//!
//! Twice in a row: a writer that rewrites the file in place (`cat > policy.toml`, some
//! editors) leaves it half-written for a moment, and a prefix can be valid TOML with a new
//! version (`version = 8` and nothing else), which would be applied and then make the whole
//! file, at the same version, look like a version that was not raised. Bytes that did not
//! change over [`SETTLE`] are taken as a finished write.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::ServingCore;
use crate::control::FollowedVersion;
use crate::control::policy_file::{self, PolicyFile};

/// The poll interval's bounds (`--policy-file-poll-ms`, 500 by default).
pub const POLL_RANGE_MS: std::ops::RangeInclusive<u64> = 50..=60_000;
/// How long new bytes must stay the same before they are applied (at most the poll
/// interval).
pub const SETTLE: Duration = Duration::from_millis(100);

/// Follows `path` until the task is aborted; `applied` holds the bytes applied at start.
pub async fn follow(core: Arc<ServingCore>, path: PathBuf, poll: Duration, mut applied: Vec<u8>) {
    let mut interval = tokio::time::interval(poll);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    // New bytes seen once, applied when the next read sees them again.
    let mut settling: Option<Vec<u8>> = None;
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
        if bytes == applied {
            settling = None;
            continue;
        }
        if settling.as_ref() != Some(&bytes) {
            // Read again after SETTLE rather than a whole interval later.
            settling = Some(bytes);
            tokio::time::sleep(SETTLE.min(poll)).await;
            interval.reset_immediately();
            continue;
        }
        settling = None;
        let sha256 = policy_file::digest(&bytes);
        let result = PolicyFile::from_bytes(&path, &bytes)
            .map_err(|e| e.0)
            .and_then(|file| apply(&core, &path, &file, &sha256).map(|()| file.version));
        // Refused contents are not tried again until the file changes.
        applied = bytes;
        match result {
            Ok(version) => tracing::info!(file = %path.display(), version, %sha256, "policy file applied"),
            Err(e) => {
                core.metrics.policy_file_refused();
                tracing::error!(error = %e, %sha256, "policy file refused");
            }
        }
    }
}

/// Checks `file` against every served model, then applies it to all of them: a model the
/// file names takes its entry, any other its `config.toml` policy. Nothing changes when a
/// check fails; the error names every model and field at fault. A file that names models,
/// none of which this server serves, is refused ([`PolicyFile::unserved`]); models it names
/// that other replicas serve are logged.
pub fn apply(core: &ServingCore, path: &Path, file: &PolicyFile, sha256: &str) -> Result<(), String> {
    let models = core.models();
    let served: Vec<&str> = models.iter().map(|m| m.interface.name.as_str()).collect();
    let unserved = file.unserved(&served).map_err(|e| format!("{}: {e}", path.display()))?;
    for name in unserved {
        tracing::warn!(file = %path.display(), model = %name, "the policy file names a model this server does not serve");
    }
    let mut errors = Vec::new();
    let mut prepared = Vec::with_capacity(models.len());
    for m in &models {
        let name = &m.interface.name;
        let checked = m
            .policy
            .prepare_file(file.models.get(name), &m.dir.config.policy)
            .and_then(|p| m.policy.check_file(&p, file.version).map(|()| p));
        match checked {
            Ok(p) => prepared.push((m, p)),
            Err(e) => errors.push(format!("models.{name}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(format!("{}: {}; nothing was changed", path.display(), errors.join("; ")));
    }
    let who = format!("policy file {} version {}", path.display(), file.version);
    let followed = FollowedVersion {
        path: path.display().to_string(),
        version: file.version,
        sha256: sha256.to_string(),
    };
    let mut done = Vec::new();
    for (m, p) in prepared {
        // Checked above under the same rules; only a concurrent change could refuse it now.
        if let Err(e) = m.apply_file_policy(p, followed.clone(), &who) {
            return Err(format!(
                "{}: models.{}: {e}; applied to {} before that",
                path.display(),
                m.interface.name,
                if done.is_empty() { "no model".to_string() } else { done.join(", ") }
            ));
        }
        done.push(m.interface.name.clone());
    }
    core.metrics.policy_file_applied(file.version);
    Ok(())
}
