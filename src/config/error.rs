//! Configuration errors that name the file, the line and a fix, and YAML parsing that produces them.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found while loading: where it is, what is wrong and how to fix it.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub message: String,
    pub hint: Option<String>,
}

impl ConfigError {
    pub fn new(file: Option<&Path>, message: impl Into<String>) -> Self {
        Self {
            file: file.map(Path::to_path_buf),
            line: None,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A YAML syntax or schema error, with its line when the parser knows it.
    pub fn yaml(file: &Path, err: &serde_yaml::Error) -> Self {
        let message = err.to_string();
        // The parser appends " at line L column C"; the line is reported in its own field.
        let message = match message.find(" at line ") {
            Some(at) => message[..at].to_string(),
            None => message,
        };
        let hint = if message.contains("unknown field") {
            Some("check the spelling; docs/CONFIGURATION.md lists every setting".to_string())
        } else {
            None
        };
        Self {
            file: Some(file.to_path_buf()),
            line: err.location().map(|l| l.line()),
            message,
            hint,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            _ => {}
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

/// Every problem found in one load; nothing is applied unless this is empty.
#[derive(Debug)]
pub struct LoadErrors(pub Vec<ConfigError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

/// Parses a YAML document, treating a file with nothing but comments as empty (all defaults).
pub fn parse_yaml<T: for<'de> Deserialize<'de> + Default>(
    file: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let has_content = text
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "---");
    if !has_content {
        return Ok(T::default());
    }
    serde_yaml::from_str(text).map_err(|e| ConfigError::yaml(file, &e))
}
