//! Board and sensor names as the user gives them: a literal name or a glob (`S5D9-*`,
//! `sensors.Accel?`). A pattern also says which row groups might hold a match, from the
//! `thing` column's min/max statistics: a literal is between them, a glob's literal prefix
//! overlaps them.

/// One name or glob. `*` matches any run of characters, `?` exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
}

impl Pattern {
    pub fn new(text: impl Into<String>) -> Self {
        Pattern { text: text.into() }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it names exactly one thing (no wildcard).
    pub fn is_literal(&self) -> bool {
        !self.text.contains(['*', '?'])
    }

    /// The text before the first wildcard: every match starts with it.
    fn prefix(&self) -> &str {
        let end = self.text.find(['*', '?']).unwrap_or(self.text.len());
        &self.text[..end]
    }

    pub fn matches(&self, name: &str) -> bool {
        glob(self.text.as_bytes(), name.as_bytes())
    }

    /// Whether a row group whose names lie in `min..=max` (either bound unknown: `None`) may
    /// hold a match.
    pub fn may_match_range(&self, min: Option<&[u8]>, max: Option<&[u8]>) -> bool {
        let prefix = self.prefix().as_bytes();
        if self.is_literal() {
            return min.is_none_or(|min| min <= prefix) && max.is_none_or(|max| max >= prefix);
        }
        // Some name starting with `prefix` lies in the range: the range's max is not below
        // the prefix, and its min is not past every name with the prefix.
        max.is_none_or(|max| max >= prefix)
            && min.is_none_or(|min| &min[..min.len().min(prefix.len())] <= prefix)
    }
}

/// Iterative glob match with backtracking to the last `*`: linear in practice, never
/// exponential.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether any of `patterns` matches `name`; no patterns match everything.
pub fn any_matches(patterns: &[Pattern], name: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_a_shell_would() {
        let cases = [
            ("S5D9-0001", "S5D9-0001", true),
            ("S5D9-0001", "S5D9-00012", false),
            ("S5D9-*", "S5D9-0001", true),
            ("S5D9-*", "S5D9-", true),
            ("S5D9-*", "s5d9-0001", false),
            ("*", "", true),
            ("sensors.Accel?", "sensors.AccelX", true),
            ("sensors.Accel?", "sensors.Accel", false),
            ("*.Temperature*", "sensors.TemperatureC", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("**", "anything", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(name),
                expected,
                "{pattern} vs {name}"
            );
        }
    }

    #[test]
    fn statistics_rule_out_only_row_groups_without_a_match() {
        /// A row group's name statistics: both bounds, or neither.
        type Bounds = (Option<Vec<u8>>, Option<Vec<u8>>);
        let range = |min: &str, max: &str| -> Bounds {
            (Some(min.as_bytes().to_vec()), Some(max.as_bytes().to_vec()))
        };
        let cases: &[(&str, Bounds, bool)] = &[
            ("S5D9-0005", range("S5D9-0001", "S5D9-0009"), true),
            ("S5D9-0005", range("S5D9-0006", "S5D9-0009"), false),
            ("S5D9-0005", range("S5D9-0001", "S5D9-0004"), false),
            ("S5D9-0005", (None, None), true),
            ("S5D9-*", range("A", "Z"), true),
            ("S5D9-*", range("S5D9-0100", "S5D9-0200"), true),
            ("S5D9-*", range("T", "Z"), false),
            ("S5D9-*", range("A", "S5D8-9999"), false),
            ("S5D9-01*", range("S5D9-0100", "S5D9-0105"), true),
            ("S5D9-01*", range("S5D9-0200", "S5D9-0300"), false),
        ];
        for (pattern, (min, max), expected) in cases {
            assert_eq!(
                Pattern::new(*pattern).may_match_range(min.as_deref(), max.as_deref()),
                *expected,
                "{pattern} in {min:?}..={max:?}"
            );
        }
    }
}
