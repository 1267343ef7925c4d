//! `${NAME}` and `${NAME:-default}` in the values of the `state:` section.

/// Expands `${NAME}` and `${NAME:-default}` from `lookup`; `$$` is a `$`.
/// An error names the variable, never a value, and in a `secret` value not
/// even a malformed name.
pub(super) fn expand(
    text: &str,
    secret: bool,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').ok_or_else(|| {
                "unterminated `${`: close it with `}` (write `$$` for a `$`)".to_owned()
            })?;
            let expression = &inner[..end];
            let (name, default) = match expression.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expression, None),
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                let shown = if secret { "..." } else { name };
                return Err(format!(
                    "`${{{shown}}}` does not name an environment variable \
                     (letters, digits and underscores; write `$$` for a `$`)"
                ));
            }
            match (
                lookup(name).filter(|v| !(v.is_empty() && default.is_some())),
                default,
            ) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set: set it, or write \
                         `${{{name}:-default}}`"
                    ))
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}
