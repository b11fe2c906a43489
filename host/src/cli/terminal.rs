//! Text for a terminal from fields that others chose: a peer writes a
//! message's text and author, a member's frames end up in dead letters'
//! reasons, a plugin names its counters. Printed raw, such a field could
//! move the cursor, rewrite earlier lines or forge a line of `status`, so
//! every control character (and the Unicode marks that reorder text) is
//! shown escaped, and nothing assumes a field's length.

use std::{borrow::Cow, fmt::Write};

/// Whether `c` would act on the terminal or reorder the text around it
/// rather than print.
fn acts(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character written as an escape (`\n`, `\u{1b}`),
/// so that it prints on one line as itself.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(acts) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if acts(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The first `chars` characters of `s` (all of it if shorter), printable.
pub fn short(s: &str, chars: usize) -> Cow<'_, str> {
    let end = s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i);
    printable(&s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_others_chose_print_on_one_line_as_themselves() {
        assert_eq!(printable("hello"), "hello");
        assert_eq!(
            printable("a\nquiet-host running\x1b[2K\u{202e}x"),
            "a\\nquiet-host running\\u{1b}[2K\\u{202e}x"
        );
        assert_eq!(short("abc", 12), "abc");
        assert_eq!(short("ééééé", 2), "éé");
        assert_eq!(short("\x1b[31mred", 2), "\\u{1b}[");
        assert_eq!(short("", 12), "");
    }
}
