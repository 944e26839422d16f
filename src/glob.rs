//! Model filters: shell-style globs (`*` any run, `?` one character) over model ids.

/// Whether `text` matches `pattern` (case-sensitive; `*` matches any run of characters including `/`).
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, at)) = backtrack {
            pi = star + 1;
            ti = at + 1;
            backtrack = Some((star, at + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// An allow list (empty = everything) and a deny list, applied to model ids without the provider prefix.
#[derive(Clone, Debug, Default)]
pub struct ModelFilter {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// A model the allow list names passes the deny list too: `WHITELIST_MODELS_<P>` over
    /// `IGNORE_MODELS_<P>`, as the Python proxy read them (`IGNORE_MODELS_<P>=*` with a whitelist is a pure
    /// whitelist). Provider files' `allow` and `deny` both hold.
    pub allow_wins: bool,
}

impl ModelFilter {
    pub fn permits(&self, model: &str) -> bool {
        let allowed = self.allow.iter().any(|g| matches(g, model));
        if self.allow_wins && allowed {
            return true;
        }
        (self.allow.is_empty() || allowed) && !self.deny.iter().any(|g| matches(g, model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whitelist_from_the_environment_wins_over_its_ignore_list() {
        let filter = |allow_wins| ModelFilter {
            allow: vec!["gemini-2.5-*".into()],
            deny: vec!["*".into()],
            allow_wins,
        };
        assert!(filter(true).permits("gemini-2.5-pro"));
        assert!(!filter(true).permits("gemini-1.5-pro"));
        assert!(
            !filter(false).permits("gemini-2.5-pro"),
            "in a provider file both hold"
        );
    }

    #[test]
    fn globs() {
        assert!(matches("gpt-*", "gpt-4o"));
        assert!(matches("*", ""));
        assert!(matches("*mini*", "gpt-4o-mini-2024"));
        assert!(matches("o?-pro", "o1-pro"));
        assert!(!matches("o?-pro", "o10-pro"));
        assert!(matches("meta-llama/*", "meta-llama/llama-3"));
        assert!(!matches("gpt-*", "chatgpt-4o"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
    }

    #[test]
    fn filter() {
        let f = ModelFilter {
            allow: vec!["gpt-*".into()],
            deny: vec!["*-audio*".into()],
            allow_wins: false,
        };
        assert!(f.permits("gpt-4o"));
        assert!(!f.permits("gpt-4o-audio-preview"));
        assert!(!f.permits("claude"));
        assert!(ModelFilter::default().permits("anything"));
    }
}
