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

    /// A YAML syntax or schema error, with its line when the parser knows it. The value at fault is described,
    /// not quoted: it may be a secret written in the wrong place.
    pub fn yaml(file: &Path, err: &serde_yaml::Error) -> Self {
        let message = err.to_string();
        // The parser appends " at line L column C"; the line is reported in its own field.
        let message = match message.find(" at line ") {
            Some(at) => message[..at].to_string(),
            None => message,
        };
        let message = unquoted(&message);
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

/// A parser's message without the values it quotes: a string value becomes its length, and a name written in the
/// file (an unknown field or variant) is kept only when it is short and looks like a name (a secret is longer).
fn unquoted(message: &str) -> String {
    static STRING: std::sync::OnceLock<regex_lite::Regex> = std::sync::OnceLock::new();
    static NAME: std::sync::OnceLock<regex_lite::Regex> = std::sync::OnceLock::new();
    let string =
        STRING.get_or_init(|| regex_lite::Regex::new(r#"string "((?:[^"\\]|\\.)*)""#).unwrap());
    let name =
        NAME.get_or_init(|| regex_lite::Regex::new(r"(field|variant|key) `([^`]*)`").unwrap());
    let message = string.replace_all(message, |c: &regex_lite::Captures<'_>| {
        format!("a string of {} characters", c[1].chars().count())
    });
    let plain = |n: &str| {
        n.len() <= 32
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    name.replace_all(&message, |c: &regex_lite::Captures<'_>| {
        match plain(&c[2]) {
            true => c[0].to_string(),
            false => format!("{} of {} characters", &c[1], c[2].chars().count()),
        }
    })
    .into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_a_parser_quotes_are_described_not_repeated() {
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Raw {
            name: Option<std::collections::BTreeMap<String, String>>,
            kind: Option<Kind>,
        }
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Kind {
            Balanced,
        }
        let secret = "sk-proj-aSecretThatWasPastedInTheWrongPlace0123456789";
        for yaml in [
            format!("name: {secret}\n"),
            format!("kind: {secret}\n"),
            format!("{secret}: 1\n"),
        ] {
            let err = parse_yaml::<Raw>(Path::new("c.yaml"), &yaml).unwrap_err();
            assert!(!err.message.contains("aSecret"), "{}", err.message);
            assert!(err.message.contains("characters"), "{}", err.message);
        }
        let err = parse_yaml::<Raw>(Path::new("c.yaml"), "nmae: 1\n").unwrap_err();
        assert!(
            err.message.contains("`nmae`"),
            "short names stay: {}",
            err.message
        );
    }
}
