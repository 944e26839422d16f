//! Env files as python-dotenv reads them, which is how `.env` files written for the Python key proxy (and most
//! others) are written: `NAME=value` with an optional `export `, `#` comments, unquoted values trimmed and ended
//! by ` #`, single-quoted values taken literally, double-quoted values with backslash escapes, quoted values over
//! several lines, and `${NAME}` / `${NAME:-default}` expanded in unquoted and double-quoted values. An unquoted
//! value may hold spaces (`MODELS=["a", "b"]`).
//!
//! Errors name the line and never quote it: a line of an env file may hold a key.

/// What is wrong, and on which line (from 1).
#[derive(Debug, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub what: &'static str,
}

/// The variables of `text` in order; `outside` supplies variables the file does not set, for `${NAME}`.
pub fn parse(
    text: &str,
    outside: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let number = i + 1;
        let fail = |what| Err(ParseError { line: number, what });
        let line = lines[i].trim_start_matches('\u{feff}').trim();
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((name, rest)) = line.split_once('=') else {
            // A bare name sets nothing, as in python-dotenv.
            if line
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            {
                continue;
            }
            return fail("this line is not NAME=value");
        };
        let name = name.trim();
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return fail("the name before `=` is not a variable name");
        }
        let rest = rest.trim_start();
        let lookup = |var: &str| {
            out.iter()
                .rev()
                .find(|(n, _)| n == var)
                .map(|(_, v)| v.clone())
                .or_else(|| outside(var))
        };
        let value = match rest.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                // The value runs to the closing quote, over as many lines as it takes.
                let mut body = rest[1..].to_string();
                let close = loop {
                    if let Some(at) = closing(&body, quote) {
                        break at;
                    }
                    let Some(next) = lines.get(i) else {
                        return fail("a quoted value is never closed");
                    };
                    body.push('\n');
                    body.push_str(next);
                    i += 1;
                };
                let after = body[close + 1..].trim();
                if !(after.is_empty() || after.starts_with('#')) {
                    return fail("text follows the closing quote");
                }
                let inner = &body[..close];
                if quote == '"' {
                    expand(&unescape(inner), &lookup)
                } else {
                    inner.replace("\\'", "'")
                }
            }
            _ => {
                let end = rest
                    .char_indices()
                    .find(|&(at, c)| c == '#' && rest[..at].ends_with([' ', '\t']))
                    .map_or(rest.len(), |(at, _)| at);
                expand(rest[..end].trim(), &lookup)
            }
        };
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// Where the closing `quote` is in `body`; a backslash escapes the next character (in single quotes, only `\'`
/// means anything: a quote).
fn closing(body: &str, quote: char) -> Option<usize> {
    let mut escaped = false;
    for (at, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == quote => return Some(at),
            _ => {}
        }
    }
    None
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(c @ ('"' | '\'' | '\\')) => out.push(c),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// `${NAME}` and `${NAME:-default}` replaced; anything else left as written.
fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        out.push_str(&rest[..start]);
        let inner = &rest[start + 2..start + len];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        match lookup(name).filter(|v| !v.is_empty()) {
            Some(value) => out.push_str(&value),
            None => out.push_str(default.unwrap_or("")),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Vec<(String, String)> {
        parse(text, &|name| {
            (name == "HOME").then(|| "/home/me".to_string())
        })
        .unwrap()
    }

    #[test]
    fn reads_what_python_dotenv_reads() {
        let text = "# a comment\n\nexport A=1\nB = spaced value # a comment\nC=[\"m-a\", \"m-b\"]\n\
                    D='literal ${A} \\n'\nE=\"line\\nbreak ${A} \\\"quoted\\\"\" # after\nF=\"two\nlines\"\n\
                    G=${HOME}/x\nH=${MISSING:-fallback}\nI=a#not-a-comment\nJ=\n";
        let vars = read(text);
        let get = |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("spaced value"));
        assert_eq!(get("C"), Some("[\"m-a\", \"m-b\"]"));
        assert_eq!(get("D"), Some("literal ${A} \\n"));
        assert_eq!(get("E"), Some("line\nbreak 1 \"quoted\""));
        assert_eq!(get("F"), Some("two\nlines"));
        assert_eq!(get("G"), Some("/home/me/x"));
        assert_eq!(get("H"), Some("fallback"));
        assert_eq!(get("I"), Some("a#not-a-comment"));
        assert_eq!(get("J"), Some(""));
        let vars = read("BARE\nK='it\\'s'\n");
        assert_eq!(
            vars,
            [("K".to_string(), "it's".to_string())],
            "a bare name sets nothing"
        );
    }

    #[test]
    fn errors_name_the_line_without_quoting_it() {
        let none = |_: &str| None;
        assert_eq!(
            parse("A=1\nsk-secret pasted-without-a-name\n", &none),
            Err(ParseError {
                line: 2,
                what: "this line is not NAME=value"
            })
        );
        assert_eq!(parse("A=1\nB=\"open\n", &none).unwrap_err().line, 2);
        assert_eq!(parse("1A=x\n", &none).unwrap_err().line, 1);
        assert_eq!(parse("A='x' y\n", &none).unwrap_err().line, 1);
    }
}
