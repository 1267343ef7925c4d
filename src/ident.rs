//! Names in SQL text: [`quote_identifier`], the one function through which
//! every name, given by the user or read back from the catalog, enters SQL
//! text, and the filling of SQL templates with quoted names.

/// `name` as one PostgreSQL identifier: wrapped in double quotes, with each
/// double quote it holds doubled, so that whatever the name contains
/// (quotes, semicolons, comment marks, spaces, `$$`) it stays one name and
/// is taken exactly as written, upper case included.
///
/// Table and channel names given to a store are checked before they are
/// used; this is what keeps names the crate reads back from the catalog
/// (indexes, schemas, partitions) from being read as SQL. Use it for
/// statements of your own that name a store's objects.
///
/// ```
/// use trebuchet_postgres::quote_identifier;
///
/// assert_eq!(quote_identifier("actor_states"), "\"actor_states\"");
/// assert_eq!(
///     quote_identifier("evil\"; DROP TABLE t; --"),
///     "\"evil\"\"; DROP TABLE t; --\""
/// );
/// ```
///
/// PostgreSQL refuses SQL text that holds a NUL character, so a name with
/// one makes the statement fail rather than name something else.
pub fn quote_identifier(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if c == '"' {
            quoted.push('"');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// `template` with each `{{key}}` of `values` (keys written with their
/// braces) replaced by its text, which is SQL made of quoted names. In one
/// pass: text put in is never searched for keys again, so a name that
/// holds `{{table}}` stays as it is. The template's `$$` dollar quotes
/// become a tag that none of the texts holds (`$$`, else `$fn1$`, `$fn2$`,
/// ...): a name in a dollar-quoted function body that held the tag would
/// end the body there.
pub(crate) fn fill_template(template: &str, values: &[(&str, &str)]) -> String {
    let mut tag = "$$".to_owned();
    let mut n = 0;
    while values.iter().any(|(_, text)| text.contains(&tag)) {
        n += 1;
        tag = format!("$fn{n}$");
    }
    let template = template.replace("$$", &tag);
    let mut out = String::with_capacity(template.len());
    let mut rest = template.as_str();
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let at = &rest[start..];
        match values.iter().find(|(key, _)| at.starts_with(key)) {
            Some((key, text)) => {
                out.push_str(text);
                rest = &at[key.len()..];
            }
            None => {
                out.push_str("{{");
                rest = &at[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::{fill_template, quote_identifier};

    /// Reads one quoted identifier back as PostgreSQL's scanner does: the
    /// name, and whatever follows the closing quote.
    fn scan(sql: &str) -> (String, &str) {
        let body = sql.strip_prefix('"').expect("starts with a quote");
        let mut name = String::new();
        let mut chars = body.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if matches!(chars.peek(), Some((_, '"'))) {
                    chars.next();
                    name.push('"');
                } else {
                    return (name, &body[i + 1..]);
                }
            } else {
                name.push(c);
            }
        }
        panic!("unterminated identifier: {sql}");
    }

    #[test]
    fn plain_names_are_wrapped_in_quotes() {
        assert_eq!(quote_identifier("actor_states"), "\"actor_states\"");
        assert_eq!(quote_identifier("Rooms"), "\"Rooms\"");
        assert_eq!(quote_identifier(""), "\"\"");
    }

    #[test]
    fn embedded_double_quotes_are_doubled() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_identifier("\""), "\"\"\"\"");
        assert_eq!(quote_identifier("a\"\"b"), "\"a\"\"\"\"b\"");
        assert_eq!(
            quote_identifier("evil\"; CREATE TABLE pwned(x int); --"),
            "\"evil\"\"; CREATE TABLE pwned(x int); --\""
        );
    }

    #[test]
    fn every_odd_name_reads_back_as_itself_and_ends_the_identifier() {
        for name in [
            "evil\"; CREATE TABLE pwned(x int); --",
            "\"",
            "\"\"",
            "ends with a quote\"",
            "\"starts with one",
            "it's",
            "semi;colon -- comment /* too */",
            "dollar$$ quote $tag$",
            "  spaces  ",
            "ünï \"cödé\" ✓",
            "back\\slash",
            "new\nline",
        ] {
            let sql = format!("{} AFTER", quote_identifier(name));
            let (read, rest) = scan(&sql);
            assert_eq!(read, name);
            assert_eq!(rest, " AFTER", "{name:?} ends where its quotes end");
        }
    }

    #[test]
    fn a_template_is_filled_in_one_pass() {
        let table = quote_identifier("{{trigger}}\"; --");
        let trigger = quote_identifier("t");
        let sql = fill_template(
            "ALTER TABLE {{table}} ENABLE TRIGGER {{trigger}}; {{unknown}}",
            &[("{{table}}", &table), ("{{trigger}}", &trigger)],
        );
        assert_eq!(
            sql,
            "ALTER TABLE \"{{trigger}}\"\"; --\" ENABLE TRIGGER \"t\"; {{unknown}}"
        );
        assert_eq!(fill_template("{{", &[]), "{{");
        assert_eq!(fill_template("a {{b", &[("{{b}}", "x")]), "a {{b");
    }

    #[test]
    fn the_dollar_quote_tag_is_one_no_name_holds() {
        let body = "CREATE FUNCTION f() RETURNS INT AS $$ SELECT {{n}} $$ LANGUAGE sql";
        let plain = quote_identifier("plain");
        assert_eq!(
            fill_template(body, &[("{{n}}", &plain)]),
            "CREATE FUNCTION f() RETURNS INT AS $$ SELECT \"plain\" $$ LANGUAGE sql"
        );
        let dollars = quote_identifier("x$$; DROP TABLE t; -- $fn1$");
        assert_eq!(
            fill_template(body, &[("{{n}}", &dollars)]),
            format!("CREATE FUNCTION f() RETURNS INT AS $fn2$ SELECT {dollars} $fn2$ LANGUAGE sql")
        );
    }
}
