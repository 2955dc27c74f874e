//! The fleet's policy file (`sluice serve --policy-file`): one TOML document that every
//! replica of a fleet follows (a mounted Kubernetes ConfigMap, docs/deploy.md).
//!
//! ```toml
//! version = 7                     # the fleet's policy version: raise it with every edit
//!
//! [models.fashion-resnet20]       # the same fields as a `PUT /v2/models/{m}/gating` body
//! budget = 0.5
//! ```
//!
//! A model the file names runs the file's policy (unset fields take their defaults, as a
//! `PUT` does); a served model it does not name runs its `config.toml` policy. The file's
//! `version` becomes the policy version of every model, so each replica that applied the
//! same file answers with the same version.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use super::policy::{PolicyChange, PolicyError};

/// The largest policy file read; a bigger one is refused before it is read.
pub const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// A parsed policy file (not yet checked against any model).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The fleet's policy version: positive, raised with every edit (a file whose version
    /// is not above the one applied is refused, so every replica's version means one file).
    pub version: u64,
    /// Policies by model name.
    #[serde(default)]
    pub models: BTreeMap<String, PolicyChange>,
}

impl PolicyFile {
    /// Parses the file's text; errors name the key (and line) at fault.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| PolicyError(e.to_string().trim().to_string()))?;
        if file.version == 0 {
            return Err(PolicyError(
                "version: must be a positive integer, raised with every change of the file".into(),
            ));
        }
        Ok(file)
    }

    /// Reads `path` (at most [`MAX_POLICY_FILE_BYTES`], checked before reading) and returns
    /// its bytes, so a watcher can tell whether it changed.
    pub fn read_bytes(path: &Path) -> Result<Vec<u8>, PolicyError> {
        let cannot = |e: std::io::Error| PolicyError(format!("cannot read {}: {e}", path.display()));
        // Only a regular file (through symlinks, as a ConfigMap mounts it): opening a FIFO
        // or a device could block or never end.
        if !std::fs::metadata(path).map_err(cannot)?.is_file() {
            return Err(PolicyError(format!("{} is not a regular file", path.display())));
        }
        let file = std::fs::File::open(path).map_err(cannot)?;
        let len = file.metadata().map_err(cannot)?.len();
        if len > MAX_POLICY_FILE_BYTES {
            return Err(too_big(path, len));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        // The file may grow between the check and the read: never take more than the limit.
        file.take(MAX_POLICY_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(cannot)?;
        if bytes.len() as u64 > MAX_POLICY_FILE_BYTES {
            return Err(too_big(path, bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// Parses bytes read by [`PolicyFile::read_bytes`].
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, PolicyError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| PolicyError(format!("{}: not UTF-8 text: {e}", path.display())))?;
        PolicyFile::parse(text).map_err(|e| PolicyError(format!("{}: {e}", path.display())))
    }

    /// The models the file names that are not among `served` (other replicas' models, to
    /// log); refused when the file names models and none is served, since a typo'd name would
    /// otherwise send every model back to its config's policy.
    pub fn unserved<'a>(&'a self, served: &[&str]) -> Result<Vec<&'a str>, PolicyError> {
        let unserved: Vec<&str> =
            self.models.keys().map(String::as_str).filter(|n| !served.contains(n)).collect();
        if !self.models.is_empty() && unserved.len() == self.models.len() {
            return Err(PolicyError(format!(
                "models: names only models this server does not serve ({}); it serves {}",
                unserved.join(", "),
                served.join(", ")
            )));
        }
        Ok(unserved)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        PolicyFile::from_bytes(path, &PolicyFile::read_bytes(path)?)
    }
}

/// SHA-256 of a policy file's bytes, in hex: what replicas compare to know they applied the
/// same file.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn too_big(path: &Path, len: u64) -> PolicyError {
    PolicyError(format!(
        "{}: {len} bytes is over the policy file limit of {MAX_POLICY_FILE_BYTES} bytes",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions_and_per_model_policies() {
        let f = PolicyFile::parse(
            "version = 3\n[models.a]\nbudget = 0.5\n[models.b]\nchannel_threshold = 0.2\nchannel_mode = \"select\"\n",
        )
        .unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.models["a"].budget, Some(0.5));
        assert_eq!(f.models["b"].channel_threshold, Some(0.2));
        assert!(PolicyFile::parse("version = 1\n").unwrap().models.is_empty());
    }

    #[test]
    fn refusals_name_the_field() {
        let err = |text: &str| PolicyFile::parse(text).unwrap_err().0;
        assert!(err("[models.a]\nbudget = 0.5\n").contains("version"), "{}", err("[models.a]\n"));
        assert!(err("version = 0\n").contains("version: must be a positive integer"));
        assert!(err("version = -2\n").contains("version"));
        assert!(err("version = 1\n[models.a]\nbugdet = 0.5\n").contains("bugdet"));
        assert!(err("version = 1\nextra = true\n").contains("extra"));
        assert!(err("version = 1\n[models.a]\nbudget = \"half\"\n").contains("budget"));
    }

    #[test]
    fn a_file_must_name_a_served_model_if_it_names_any() {
        let f = PolicyFile::parse("version = 1\n[models.a]\nbudget = 0.5\n[models.b]\n").unwrap();
        assert_eq!(f.unserved(&["a", "c"]).unwrap(), ["b"]);
        let e = f.unserved(&["c"]).unwrap_err().0;
        assert!(e.contains("names only models this server does not serve (a, b); it serves c"), "{e}");
        assert!(PolicyFile::parse("version = 1\n").unwrap().unserved(&["c"]).unwrap().is_empty());
    }

    #[test]
    fn oversized_files_are_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let mut text = String::from("version = 1\n");
        while (text.len() as u64) <= MAX_POLICY_FILE_BYTES {
            text.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&path, &text).unwrap();
        let e = PolicyFile::load(&path).unwrap_err().0;
        assert!(e.contains("over the policy file limit"), "{e}");
        std::fs::write(&path, "version = 2\n").unwrap();
        assert_eq!(PolicyFile::load(&path).unwrap().version, 2);
        assert!(PolicyFile::load(&dir.path().join("missing.toml")).unwrap_err().0.contains("cannot read"));
        assert!(PolicyFile::load(dir.path()).unwrap_err().0.contains("not a regular file"));
        assert_eq!(
            digest(b"version = 2\n"),
            digest(&std::fs::read(&path).unwrap()),
            "the digest is of the bytes"
        );
        assert_eq!(digest(b"").len(), 64);
        assert_ne!(digest(b"version = 2\n"), digest(b"version = 3\n"));
    }
}
